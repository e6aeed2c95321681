#!/usr/bin/env bash
# Throw-away TLS + SuperNode-authentication material for a Flower deployment.
#
#   docker/make-certs.sh OUT_DIR [NUM_NODES] [EXTRA_SAN...]
#
# OUT_DIR/ca.crt, ca.key        a self-signed CA (valid 365 days)
# OUT_DIR/server.pem, server.key  the SuperLink certificate, signed by that CA, with
#                               subjectAltNames localhost, superlink, 127.0.0.1, ::1
#                               plus every EXTRA_SAN (an IP address or a DNS name)
# OUT_DIR/node-K, node-K.pub    K = 1..NUM_NODES (default 3): SuperNode authentication
#                               key pairs (SSH ECDSA P-384; Flower 1.41 accepts only
#                               elliptic-curve keys for --auth-supernode-private-key)
#
# Idempotent: nothing is regenerated when OUT_DIR/ca.crt exists (missing node keys
# are still added). These keys are for tests and trials: for a real federation, keep
# ca.key off the SuperLink machine and give each site only its own node-K.
set -euo pipefail

usage() {
    echo "usage: $0 OUT_DIR [NUM_NODES] [EXTRA_SAN...]" >&2
    echo "  NUM_NODES: a positive integer (default 3)" >&2
    echo "  EXTRA_SAN: extra host names or IP addresses for the SuperLink certificate" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help|"") usage ;; esac
OUT=$1
NUM_NODES=${2:-3}
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || usage
shift $(( $# >= 2 ? 2 : 1 ))

command -v openssl >/dev/null || { echo "error: openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "error: ssh-keygen not found" >&2; exit 1; }

mkdir -p "$OUT"

if [[ -f "$OUT/ca.crt" ]]; then
    echo "$OUT/ca.crt exists: keeping the existing CA and server certificate."
else
    san="DNS:localhost,DNS:superlink,IP:127.0.0.1,IP:::1"
    for extra in "$@"; do
        if [[ "$extra" =~ ^[0-9.]+$ || "$extra" == *:* ]]; then
            san="$san,IP:$extra"
        else
            san="$san,DNS:$extra"
        fi
    done
    conf=$(mktemp)
    trap 'rm -f "$conf" "$OUT/server.csr" "$OUT/ca.crt.srl"' EXIT
    cat >"$conf" <<CONF
[req]
prompt = no
default_md = sha256
distinguished_name = dn
req_extensions = req_ext

[dn]
O = fedgen throw-away
CN = superlink

[req_ext]
subjectAltName = $san
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
CONF
    openssl genrsa -out "$OUT/ca.key" 2048 2>/dev/null
    openssl req -new -x509 -key "$OUT/ca.key" -sha256 -days 365 \
        -subj "/O=fedgen throw-away CA/CN=fedgen-ca" -out "$OUT/ca.crt.tmp"
    openssl genrsa -out "$OUT/server.key" 2048 2>/dev/null
    openssl req -new -key "$OUT/server.key" -config "$conf" -out "$OUT/server.csr"
    openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt.tmp" -CAkey "$OUT/ca.key" \
        -CAcreateserial -days 365 -sha256 -extfile "$conf" -extensions req_ext \
        -out "$OUT/server.pem" 2>/dev/null
    chmod 600 "$OUT/ca.key" "$OUT/server.key"
    # ca.crt last: its presence marks a complete set
    mv "$OUT/ca.crt.tmp" "$OUT/ca.crt"
    echo "wrote $OUT/ca.crt, ca.key, server.pem, server.key (SAN: $san)"
fi

for ((k = 1; k <= NUM_NODES; k++)); do
    if [[ ! -f "$OUT/node-$k" ]]; then
        rm -f "$OUT/node-$k.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedgen-site-$k" -f "$OUT/node-$k"
        echo "wrote $OUT/node-$k, node-$k.pub"
    fi
done
