#!/usr/bin/env bash
# Install what the test suite needs, then return quickly on every later run.
#
# usage: bash tests/bootstrap.sh [PYTHON]      (PYTHON defaults to python3)
#
# 1. Command-line clients and the browser the end-to-end tests drive: curl, wget, git, openssl,
#    Node.js, Chromium and ChromeDriver. A missing one is installed with apt-get (Debian, as
#    root), after one `apt-get update`. Where that is impossible, CI=true fails and any other
#    run prints a warning and goes on, so the tests that need the tool skip.
# 2. A virtual environment at .venv/X.Y for PYTHON (X.Y is its version) with the pinned packages
#    of tests/requirements.txt. A stamp file inside it records the interpreter and the
#    requirements it was built from; while both match, this step does nothing.
#
# Prints nothing when there is nothing to do. Every failure is one line starting with
# "bootstrap: error:", followed by the end of the failing tool's log where there is one.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${1:-python3}
requirements="$repo/tests/requirements.txt"

fail() {
    echo "bootstrap: error: $*" >&2
    exit 1
}

# Print the last lines of a log file after a failure line, so CI output shows the cause.
show_log_tail() {
    tail -n 25 "$1" | sed 's/^/    /' >&2
}

# --- 1. system packages -------------------------------------------------------------------

# Pairs of "command Debian-package"; the package is installed when the command is missing.
tools=(
    "curl curl"
    "wget wget"
    "git git"
    "openssl openssl"
    "node nodejs"
    "chromium chromium"
    "chromedriver chromium-driver"
)

missing=()
for pair in "${tools[@]}"; do
    read -r command package <<<"$pair"
    command -v "$command" >/dev/null 2>&1 || missing+=("$package")
done

if ((${#missing[@]})); then
    reason=""
    if ! command -v apt-get >/dev/null 2>&1; then
        reason="apt-get not found"
    elif [[ $(id -u) != 0 ]]; then
        reason="apt-get needs root"
    fi

    if [[ -n $reason ]]; then
        if [[ ${CI:-} == true ]]; then
            fail "missing packages ${missing[*]} and $reason; install them before running the tests"
        fi
        echo "bootstrap: warning: missing ${missing[*]} ($reason); tests that need them will skip" >&2
    else
        log=$(mktemp "${TMPDIR:-/tmp}/authsome-bootstrap-apt.XXXXXX")
        export DEBIAN_FRONTEND=noninteractive

        if ! apt-get update -qq >"$log" 2>&1; then
            echo "bootstrap: error: apt-get update failed; log: $log" >&2
            show_log_tail "$log"
            exit 1
        fi
        if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
            echo "bootstrap: error: apt-get install ${missing[*]} failed; log: $log" >&2
            show_log_tail "$log"
            exit 1
        fi
        rm -f "$log"

        for pair in "${tools[@]}"; do
            read -r command package <<<"$pair"
            command -v "$command" >/dev/null 2>&1 \
                || fail "package $package installed but command '$command' is still not on PATH"
        done
    fi
fi

# --- 2. virtual environment -----------------------------------------------------------------

[[ -f $requirements ]] || fail "$requirements is missing"

interpreter=$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3], sys.executable)' 2>/dev/null) \
    || fail "interpreter '$python' not found or does not start; pass a Python 3.9+ path"
read -r version executable <<<"$interpreter"
major_minor=${version%.*}
case $major_minor in
    3.[0-8]) fail "interpreter '$python' is Python $version; authsome's tests need Python 3.9 or newer" ;;
esac

venv="$repo/.venv/$major_minor"
stamp="$venv/.bootstrap-stamp"
expected_stamp="interpreter: $executable $version
$(cat "$requirements")"

if [[ -x $venv/bin/python && -f $stamp && "$(cat "$stamp")" == "$expected_stamp" ]]; then
    exit 0
fi

log=$(mktemp "${TMPDIR:-/tmp}/authsome-bootstrap-pip.XXXXXX")

# A venv whose interpreter no longer starts (Python moved or upgraded) is rebuilt from scratch.
if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c pass >/dev/null 2>&1; then
    :
else
    "$python" -m venv --clear "$venv" >"$log" 2>&1 || {
        echo "bootstrap: error: '$python -m venv $venv' failed; log: $log" >&2
        show_log_tail "$log"
        exit 1
    }
fi

rm -f "$stamp"
if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --quiet --no-input \
        -r "$requirements" >>"$log" 2>&1; then
    echo "bootstrap: error: pip install -r tests/requirements.txt failed for Python $version; log: $log" >&2
    show_log_tail "$log"
    exit 1
fi
rm -f "$log"

printf '%s\n' "$expected_stamp" >"$stamp"
