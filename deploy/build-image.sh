#!/bin/sh
# Build the image with this machine's pip settings, with BuildKit or the legacy builder.
#
#   sh deploy/build-image.sh [docker build options...]     e.g. -t multvae-rec:latest
#
# pip inside a build sees none of the machine's configuration: behind an inspecting proxy it
# cannot verify PyPI's certificate, and wheels the machine keeps locally (find-links) are out
# of reach. This script hands the build what `pip config list` shows here:
#   cert                   the CA bundle, as the BuildKit secret `pip-cert`
#   index-url, extra-index-url (http/https ones)      in a pip.conf, the BuildKit secret `pip.conf`
#   find-links directories served read-only on 127.0.0.1 for the build (--network host)
# Secrets are mounted only into the RUN steps that install, never into a layer.
#
# Overrides: MULTVAE_PIP_CERT (a CA bundle file), MULTVAE_PIP_WHEELS (space-separated wheel
# directories), MULTVAE_BUILDER=buildkit|legacy (default: BuildKit when a docker client can
# use it: `docker buildx`, or a client older than 23 with DOCKER_BUILDKIT=1, else legacy),
# DOCKER (the client to use).
#
# The legacy builder has no secret mounts: the script strips them from the Dockerfile and
# copies the two files into the *build* stage instead (they stay in that stage's cached
# layers on this builder, never in the runtime image; `docker builder prune` drops them).
set -eu
cd "$(dirname "$0")/.."

work=$(mktemp -d)
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
    rm -rf "$work" .pip-build
}
trap cleanup EXIT INT TERM

# The value of a pip setting as pip resolves it here (environment over files), or empty.
pip_setting() {
    python3 -m pip config list 2>/dev/null \
        | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | tail -n 1
}

# -- pip settings for the build ---------------------------------------------------------------
cert="${MULTVAE_PIP_CERT-$(pip_setting cert)}"
wheels="${MULTVAE_PIP_WHEELS-$(pip_setting find-links)}"
conf="$work/pip.conf"
echo "[global]" >"$conf"
for key in index-url extra-index-url; do
    urls=""
    for url in $(pip_setting "$key"); do
        case "$url" in http://* | https://*) urls="$urls $url" ;; esac
    done
    [ -n "$urls" ] && echo "$key =$urls" >>"$conf"
done
if [ -n "$cert" ]; then
    [ -s "$cert" ] || { echo "build-image: CA bundle $cert is missing or empty" >&2; exit 2; }
    echo "cert = /run/secrets/pip-cert" >>"$conf"
fi

network=""
served="$work/wheels"
mkdir "$served"
for dir in $wheels; do
    dir="${dir#file://}"
    [ -d "$dir" ] || continue
    for wheel in "$dir"/*.whl; do
        [ -e "$wheel" ] && ln -sf "$wheel" "$served/"
    done
done
if [ -n "$(ls "$served")" ]; then
    python3 -c '
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(server.server_address[1], flush=True)
server.serve_forever()
' "$served" >"$work/port" 2>/dev/null &
    server_pid=$!
    until [ -s "$work/port" ]; do
        kill -0 "$server_pid" 2>/dev/null || { echo "build-image: wheel server failed" >&2; exit 1; }
        sleep 0.1
    done
    echo "find-links = http://127.0.0.1:$(cat "$work/port")/" >>"$conf"
    network="--network=host"
fi

# -- the builder --------------------------------------------------------------------------------
buildkit_client() {
    for candidate in ${DOCKER:-docker /usr/bin/docker}; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        # An empty image: its id is the same on every engine; removed unless tagged.
        if probe=$(printf 'FROM scratch\n' | DOCKER_BUILDKIT=1 "$candidate" build -q - 2>/dev/null)
        then
            "$candidate" image rm "$probe" >/dev/null 2>&1 || true
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

builder="${MULTVAE_BUILDER:-auto}"
client=""
if [ "$builder" != legacy ]; then
    if client=$(buildkit_client); then
        builder=buildkit
    elif [ "$builder" = buildkit ]; then
        echo "build-image: no docker client here can build with BuildKit" >&2
        exit 2
    else
        builder=legacy
    fi
fi
client="${client:-${DOCKER:-docker}}"
echo "build-image: $builder builder ($client); pip settings: $(grep -c = "$conf") line(s)" \
    "${cert:+, CA bundle $cert}${network:+, wheels from $wheels}" >&2

if [ "$builder" = buildkit ]; then
    set -- --secret "id=pip.conf,src=$conf" ${cert:+--secret "id=pip-cert,src=$cert"} "$@"
    # shellcheck disable=SC2086  # $network is one option or nothing
    DOCKER_BUILDKIT=1 "$client" build $network "$@" .
else
    mkdir .pip-build
    cp "$conf" .pip-build/pip.conf
    [ -n "$cert" ] && cp "$cert" .pip-build/pip-cert
    sed -e 's/--mount=type=secret,id=[a-z.-]* //g' \
        -e 's|^\(FROM .* AS build\)$|\1\nCOPY .pip-build/ /run/secrets/|' Dockerfile \
        >"$work/Dockerfile"
    # shellcheck disable=SC2086
    DOCKER_BUILDKIT=0 "$client" build $network -f "$work/Dockerfile" "$@" .
fi
