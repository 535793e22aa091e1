#!/bin/sh
# Test-only stand-ins for the three public base images, built from Debian packages, for a
# machine that reaches package indexes (a Debian mirror, PyPI) but no image registry.
#
#   sh deploy/stand-ins.sh            build each missing tag (a real image is never replaced)
#                                     (the three in parallel; exit 1 if any failed)
#
# Each is a `mmdebstrap --variant=minbase` root filesystem of Debian bookworm turned into an
# image by `docker import`, tagged exactly as the Dockerfile and docker-compose.yml name the
# official image, and labelled org.multvae.stand-in=true. They are NOT the official images;
# deploy/README.md lists how they differ. Needs root, mmdebstrap and a Debian mirror
# ($DEBIAN_MIRROR, default http://deb.debian.org/debian).
set -eu

mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
label=org.multvae.stand-in=true

# stand_in TAG PACKAGES [docker import --change ...] -- [mmdebstrap hooks...]
stand_in() {
    tag=$1 packages=$2
    shift 2
    if docker image inspect "$tag" >/dev/null 2>&1; then
        echo "stand-ins: $tag already present; kept"
        return 0
    fi
    changes=""
    while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
        changes="$changes
$1"
        shift
    done
    [ "$#" -gt 0 ] && shift
    start=$(date +%s)
    # One --change per line of $changes; the hooks are the remaining arguments.
    set -- --variant=minbase --include="$packages" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$@" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        "$suite" - "$mirror"
    import_args=""
    old_ifs=$IFS
    IFS='
'
    for change in $changes; do
        import_args="$import_args
--change
$change"
    done
    # shellcheck disable=SC2086  # one argument per line
    mmdebstrap --quiet "$@" | docker import $import_args \
        --change "LABEL $label" --message "multvae-rec test-only stand-in" - "$tag" >/dev/null
    IFS=$old_ifs
    echo "stand-ins: built $tag in $(($(date +%s) - start)) s"
}

# python:3.11-slim-bookworm: Debian's python3 (3.11) in /usr/bin, venv and CA certificates.
stand_in python:3.11-slim-bookworm python3,python3-venv,ca-certificates \
    'ENV LANG=C.UTF-8' 'CMD ["python3"]' -- \
    --customize-hook='ln -sf python3 "$1/usr/bin/python"' &
python_pid=$!

# redis:7.4-alpine: Debian's redis-server 7.0. Like the official image's entrypoint, it turns
# protected mode off (no password; the compose network is the boundary) and runs as redis.
stand_in redis:7.4-alpine redis-server \
    'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' 'CMD ["redis-server"]' \
    'USER redis' 'WORKDIR /data' 'EXPOSE 6379' -- \
    --customize-hook='mkdir -p "$1/data" && chroot "$1" chown redis:redis /data' \
    --customize-hook='printf "%s\n" "#!/bin/sh" \
        "[ \"\${1:-}\" = redis-server ] && set -- \"\$@\" --protected-mode no" \
        "exec \"\$@\"" > "$1/usr/local/bin/docker-entrypoint.sh" \
        && chmod 0755 "$1/usr/local/bin/docker-entrypoint.sh"' &
redis_pid=$!

# prom/prometheus:v2.55.1: Debian's prometheus 2.42 with the official image's entry point,
# user (nobody) and data directory.
stand_in prom/prometheus:v2.55.1 prometheus \
    'ENTRYPOINT ["/usr/bin/prometheus"]' \
    'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
    'USER nobody' 'WORKDIR /prometheus' 'EXPOSE 9090' -- \
    --customize-hook='mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"' &
prometheus_pid=$!

failed=0
for pid in "$python_pid" "$redis_pid" "$prometheus_pid"; do
    wait "$pid" || failed=1
done
exit "$failed"
