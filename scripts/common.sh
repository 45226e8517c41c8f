# Helpers sourced by the project's scripts (not run on its own).
# shellcheck shell=bash

die() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "needs root to run: $*"
    fi
}

# Runs a command with its output held back: shown only if it fails, so success stays quiet.
quietly() {
    local log status=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || status=$?
    if ((status != 0)); then
        cat "$log" >&2
        rm -f "$log"
        die "failed (exit $status): $*"
    fi
    rm -f "$log"
}

# rustup installs cargo in ~/.cargo/bin, which a non-login shell (CI) may not have on PATH.
ensure_cargo() {
    local cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
    if ! command -v cargo >/dev/null 2>&1 && [[ -x $cargo_bin/cargo ]]; then
        export PATH="$cargo_bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install the Rust toolchain with rustup (rustup-init, then" \
            "'rustup toolchain install stable --component rustfmt,clippy') and put ~/.cargo/bin on PATH"
}

# Debian's Chromium and its WebDriver, for the browser tests of the operations page
# (tests/ui_browser.rs). Installed once; nothing is downloaded by a test itself.
ensure_chromium() {
    if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "the browser tests need Chromium and ChromeDriver at /usr/bin (Debian packages" \
            "chromium and chromium-driver), and apt-get is not here to install them"
    echo "installing chromium and chromium-driver (for tests/ui_browser.rs)…"
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        chromium chromium-driver
}
