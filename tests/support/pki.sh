#!/bin/sh
# Makes a development/test PKI with the openssl command-line tool.
#
#   tests/support/pki.sh DIR
#
# DIR/ca.crt          the CA that relay trusts for clients and bunny trusts for relay
# DIR/server.{crt,key}  relay: SAN DNS:localhost, DNS:relay.test, IP:127.0.0.1, IP:::1
# DIR/wrongname.{crt,key}  a server certificate for DNS:wrong.test only
# DIR/<client>.{crt,key} for each client identity:
#   worker    URI spiffe://test/ns/jobs/sa/bunny
#   worker2   URI spiffe://test/ns/jobs/sa/bunny2
#   producer  DNS producer.test
#   admin     CN ops-admin
#   nogrant   CN nobody
#   expired   URI spiffe://test/ns/jobs/sa/bunny, expired in 2020
#   revoked   URI spiffe://test/ns/jobs/sa/revoked, listed in DIR/crl.pem
#   foreign   URI spiffe://test/ns/jobs/sa/bunny, issued by another CA
#   cn-behind-uri   URI spiffe://test/ns/evil/sa/anything, CN ops-admin
#   dns-behind-uri  URI spiffe://test/ns/evil/sa/anything, DNS producer.test
#   bad-first-uri   URI "spiffe://test/x\x01", then URI spiffe://test/ns/jobs/sa/bunny
#   two-cn          CN ops-admin and CN nobody
#   producer2       DNS producer2.test (a second producer, for fairness tests)
# DIR/crl.pem        the CA's CRL
# Keys are ECDSA P-256, readable by the owner only.
set -eu
dir=${1:?usage: pki.sh DIR}
mkdir -p "$dir"
cd "$dir"
umask 077

openssl_quiet() { openssl "$@" >/dev/null 2>&1 || { echo "pki.sh: openssl $1 failed" >&2; openssl "$@"; }; }

make_ca() {  # name
  mkdir -p "$1.db/certs"
  : > "$1.db/index.txt"
  echo 1000 > "$1.db/serial"
  echo 1000 > "$1.db/crlnumber"
  cat > "$1.cnf" <<CNF
[ca]
default_ca = ca_section
[ca_section]
dir = $1.db
database = \$dir/index.txt
new_certs_dir = \$dir/certs
serial = \$dir/serial
crlnumber = \$dir/crlnumber
default_md = sha256
default_crl_days = 30
policy = policy_any
unique_subject = no
copy_extensions = none
[policy_any]
commonName = supplied
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $1
CNF
  openssl_quiet ecparam -name prime256v1 -genkey -noout -out "$1.key"
  openssl_quiet req -new -x509 -config "$1.cnf" -key "$1.key" -out "$1.crt" -days 3650 \
    -subj "/CN=relay test $1" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
}

issue() {  # ca name cn extensions [extra openssl ca args...]
  ca=$1 name=$2 cn=$3 ext=$4
  shift 4
  openssl_quiet ecparam -name prime256v1 -genkey -noout -out "$name.key"
  openssl_quiet req -new -utf8 -key "$name.key" -out "$name.csr" -subj "/CN=$cn"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$ext" > "$name.ext"
  openssl_quiet ca -batch -config "$ca.cnf" -cert "$ca.crt" -keyfile "$ca.key" -in "$name.csr" -out "$name.crt" \
    -extfile "$name.ext" -notext "$@"
  rm -f "$name.csr" "$name.ext"
}

make_ca ca
make_ca foreignca
client="extendedKeyUsage=clientAuth"
server="extendedKeyUsage=serverAuth"
issue ca server relay "$server
subjectAltName=DNS:localhost,DNS:relay.test,IP:127.0.0.1,IP:::1" -days 825
issue ca wrongname wrong "$server
subjectAltName=DNS:wrong.test" -days 825
issue ca worker worker "$client
subjectAltName=URI:spiffe://test/ns/jobs/sa/bunny" -days 825
issue ca worker2 worker2 "$client
subjectAltName=URI:spiffe://test/ns/jobs/sa/bunny2" -days 825
issue ca producer producer "$client
subjectAltName=DNS:producer.test" -days 825
issue ca admin ops-admin "$client" -days 825
issue ca nogrant nobody "$client" -days 825
issue ca expired worker "$client
subjectAltName=URI:spiffe://test/ns/jobs/sa/bunny" -startdate 20200101000000Z -enddate 20200102000000Z
issue ca revoked revoked "$client
subjectAltName=URI:spiffe://test/ns/jobs/sa/revoked" -days 825
issue foreignca foreign worker "$client
subjectAltName=URI:spiffe://test/ns/jobs/sa/bunny" -days 825
# Certificates whose names try to borrow another principal's grants.
issue ca cn-behind-uri ops-admin "$client
subjectAltName=URI:spiffe://test/ns/evil/sa/anything" -days 825
issue ca dns-behind-uri x "$client
subjectAltName=URI:spiffe://test/ns/evil/sa/anything,DNS:producer.test" -days 825
# A first URI SAN with a control byte, then bunny's: written as DER, which
# the config syntax cannot express. GeneralNames ::= SEQUENCE of [6] IA5String.
hex() { printf '%s' "$1" | od -An -tx1 | tr -d ' \n'; }
first="$(hex 'spiffe://test/x')01"  # 16 bytes
second=$(hex 'spiffe://test/ns/jobs/sa/bunny')  # 30 bytes
der="2.5.29.17=DER:30328610${first}861e${second}"
issue ca bad-first-uri worker "$client
$der" -days 825
issue ca two-cn "ops-admin/CN=nobody" "$client" -days 825
# Names that print like another or hold bytes a name cannot: a CN with a C1
# control (U+0085), a CN behind a right-to-left override (U+202E), and
# bunny's URI SAN followed by a byte above ASCII.
issue ca cn-c1 "ops$(printf '\302\205')admin" "$client" -days 825
issue ca cn-rlo "$(printf '\342\200\256')nimda-spo" "$client" -days 825
issue ca uri-high-byte worker "$client
2.5.29.17=DER:3021861f$(hex 'spiffe://test/ns/jobs/sa/bunny')ff" -days 825
issue ca producer2 producer2 "$client
subjectAltName=DNS:producer2.test" -days 825
openssl_quiet ca -config ca.cnf -cert ca.crt -keyfile ca.key -revoke revoked.crt
openssl_quiet ca -config ca.cnf -cert ca.crt -keyfile ca.key -gencrl -out crl.pem
chmod 644 ./*.crt crl.pem
