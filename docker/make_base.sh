#!/usr/bin/env bash
# Builds a local stand-in for the Dockerfiles' default BASE_IMAGE (pytorch/pytorch:2.13.0-cuda12.6-cudnn9-*), for
# machines that reach no container registry: Debian bookworm from debootstrap with the same torch release, 2.13.0, as
# its CPU build. Laid out as the real image is: the system Python, marked externally managed (PEP 668), torch and
# numpy installed by pip under /usr/local, and no `python` command, only `python3`. It differs in Python (3.11
# here, 3.12 there), in CUDA (none) and in the distribution (Debian, not Ubuntu).
#   bash docker/make_base.sh [TAG]     (default oneday-standin:torch2.13.0; root, debootstrap and a Docker daemon)
# Does nothing when TAG exists. The host's CA bundle (PIP_CERT) becomes the image's bundle and pip's: where a TLS
# proxy stands between this machine and the package registry, pip inside `docker build --network host` trusts it too.
set -euo pipefail
tag=${1:-oneday-standin:torch2.13.0}
torch_version=2.13.0
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "stand-in base $tag: present"; exit 0
fi
work=$(mktemp -d "${TMPDIR:-/var/tmp}/oneday-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >"$work/apt.log" 2>&1 \
    || { cat "$work/apt.log"; exit 1; }
fi
echo "stand-in base $tag: torch $torch_version and numpy wheels for Python 3.11 (host pip)"
# --python-version: wheels for the image's Python, whichever Python runs this script. Where the host has torch's
# CPU wheel on disk (2.13.0+cpu), pip takes it: a local version label sorts above the plain release.
python3 -m pip download -q --only-binary :all: --python-version 3.11 -d "$work/wheels" "torch==$torch_version" \
  numpy 2> >(grep -v "^WARNING: Location" >&2)
echo "stand-in base $tag: debootstrap bookworm"
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$work/rootfs" \
  "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log"; exit 1; }
bundle=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -f "$bundle" ] && cp "$bundle" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$work/rootfs/etc/pip.conf"
mv "$work/wheels" "$work/rootfs/tmp/wheels"
in_root() {  # env -i: none of this machine's pip settings leak in
  chroot "$work/rootfs" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PIP_ROOT_USER_ACTION=ignore "$@"
}
in_root python3 -m pip install -q --break-system-packages --no-index --find-links /tmp/wheels \
  "torch==$torch_version" numpy
in_root python3 -c "import torch; print('stand-in torch', torch.__version__)"
rm -rf "$work/rootfs/tmp/wheels" "$work/rootfs/root/.cache" "$work/rootfs/var/cache/apt/archives/"*.deb \
  "$work/rootfs/var/lib/apt/lists/"*
tar -C "$work/rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$tag" >/dev/null
echo "stand-in base $tag: built"
