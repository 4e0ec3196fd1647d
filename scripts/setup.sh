#!/usr/bin/env bash
# Install everything poco_sync needs to build and test on Debian 12, as root. Idempotent:
# each step checks first and does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJOR=${PG_MAJOR:-15}
PGRX_VERSION=0.18.1
TEST_USER=${POCO_TEST_USER:-poco}
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "run as root (it installs Debian packages and creates the test user)" >&2; exit 1; }

pkgs="postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-contrib libclang-dev clang sudo pkg-config build-essential openssl ca-certificates mount"
missing=""
for p in $pkgs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  say "apt-get install$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
# Leave the distribution's own cluster alone: we start our own servers.

command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  say "cargo install cargo-pgrx $PGRX_VERSION (about 5 minutes)"
  cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked
fi

PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
[ -x "$PG_CONFIG" ] || PG_CONFIG=/usr/bin/pg_config
if ! grep -qs "^pg$PG_MAJOR" "$HOME/.pgrx/config.toml"; then
  say "cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" >/dev/null
fi

if ! id "$TEST_USER" >/dev/null 2>&1; then
  say "creating OS user $TEST_USER (initdb and the test servers run as it)"
  useradd --system --create-home --shell /bin/bash "$TEST_USER"
fi
say "setup done"
