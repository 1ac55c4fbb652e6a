#!/usr/bin/env bash
# Pack authsome.py and providers.json into one executable zipapp, dist/authsome.pyz.
# Needs only bash and python3 with its standard library. The archive contains everything the
# program reads, so it runs with no other file beside it: `python3 authsome.pyz --version`.
# PYTHON selects the interpreter that builds it (default python3); the archive itself starts
# with `#!/usr/bin/env python3`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
output="$repo/dist/authsome.pyz"

fail() {
    echo "build.sh: error: $*" >&2
    exit 1
}

for name in authsome.py providers.json; do
    [[ -f "$repo/$name" ]] || fail "$repo/$name is missing; the archive needs it"
done
command -v "$python" >/dev/null || fail "interpreter '$python' not found; set PYTHON to a Python 3.9+ path"

staging=$(mktemp -d "${TMPDIR:-/tmp}/authsome-build.XXXXXX")
trap 'rm -rf "$staging"' EXIT

cp "$repo/authsome.py" "$repo/providers.json" "$staging/"

# __main__.py runs when Python executes the archive. It passes the command line explicitly, so
# it works whether or not main() defaults argv to sys.argv[1:].
cat >"$staging/__main__.py" <<'EOF'
import sys

import authsome

sys.exit(authsome.main(sys.argv[1:]))
EOF

# Bytecode of the building Python saves compiling authsome.py at every start (about 50 ms for
# this file). zipimport uses authsome.pyc only when the running Python has the same bytecode
# magic number, and compiles the source otherwise. The hash-based, unchecked form does not
# depend on file times, which zip archives store with 2-second precision.
"$python" -c 'import py_compile, sys
py_compile.compile(sys.argv[1], cfile=sys.argv[1] + "c", dfile="authsome.py", doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)' \
    "$staging/authsome.py" || fail "compiling authsome.py failed (see the message above)"

# A fixed timestamp on every member keeps the archive from changing with the time of the build.
touch -t 198001010000 "$staging"/*

mkdir -p "$repo/dist"
rm -f "$output.tmp"
"$python" -m zipapp "$staging" --output "$output.tmp" --python "/usr/bin/env python3" --compress \
    || fail "python -m zipapp failed (see the message above)"
chmod 0755 "$output.tmp"
mv -f "$output.tmp" "$output"

echo "built $output ($(wc -c <"$output") bytes)"
