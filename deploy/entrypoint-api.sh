#!/bin/sh
# The API's entry point under docker compose (installed in the image as multvae-api).
#
# Without MULTVAE_API_KEY the service answers /recommend to anyone who reaches it, so this
# refuses to start unless compose publishes the port on loopback only (MULTVAE_PUBLISHED_ON,
# which docker-compose.yml sets from MULTVAE_BIND): plain `docker compose up` serves this
# machine without a key; publishing beyond it needs one. Then it runs the command as is.
set -eu

published="${MULTVAE_PUBLISHED_ON:-}"
if [ -z "${MULTVAE_API_KEY:-}" ]; then
    case "$published" in
        127.* | localhost | ::1 | "[::1]")
            echo "multvae-api: MULTVAE_API_KEY is unset: /recommend is open to this machine" \
                "only (published on $published); set it before publishing beyond" >&2
            ;;
        *)
            echo "multvae-api: refusing to serve without MULTVAE_API_KEY on" \
                "'${published:-an unknown address}': set MULTVAE_API_KEY (clients send it as" \
                "X-API-Key), or publish on 127.0.0.1 (MULTVAE_BIND)" >&2
            exit 2
            ;;
    esac
fi
exec "$@"
