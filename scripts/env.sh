# Shared settings for scripts/: one cargo profile (release) everywhere, and a target
# directory outside the clone so repeated runs (and CI clones) stay warm.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/readstate-target}"
export CARGO_PROFILE_FLAG="--release"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
READSTATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export READSTATE_ROOT

# Install the Debian packages the build needs, once.
ensure_build_deps() {
  local missing=()
  for p in libclang-dev clang pkg-config libssl-dev libsasl2-dev cmake; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
