#!/usr/bin/env bash
# Copy the Debian text files that sparsekit's text sources read (sparsekit.data.text.text_files) into DEST, at
# their paths, so that a machine without the Debian packages reads the same text with SPARSEKIT_TEXT_ROOT=DEST.
# Usage: benchmarks/copy_texts.sh DEST        (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
dest=${1:?usage: copy_texts.sh DEST}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
PYTHONPATH="$repo/src" SPARSEKIT_TEXT_ROOT=/ "${PYTHON:-python3}" -c \
    'from sparsekit.data.text import text_files; print("\n".join(text_files()))' > "$dest/.files"
(cd / && xargs -d '\n' -a "$dest/.files" cp --parents -t "$dest")
echo "copied $(wc -l < "$dest/.files") files ($(du -sh "$dest" | cut -f1)) to $dest; use SPARSEKIT_TEXT_ROOT=$dest"
