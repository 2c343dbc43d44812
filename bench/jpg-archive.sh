#!/bin/sh
# The CIFAR-10 JPEG copy's layout, checked in one place for `make data`, `make gpu-bundle` and gpu-offline.sh:
# train/<class>/<image>.jpg at its top, as configs/cifar10-jpg.yaml reads it.
#   bench/jpg-archive.sh WHO ARCHIVE          refuses an archive of another layout, from its listing (make gpu-bundle)
#   bench/jpg-archive.sh WHO FOLDER           refuses an unpacked folder of another layout (gpu-offline.sh)
#   bench/jpg-archive.sh WHO ARCHIVE FOLDER   unpacks ARCHIVE into FOLDER, whole, and marks it (make data, gpu-offline.sh)
# WHO opens each one-line error, on stdout, as make's own lines. Checked before the archive is bundled or marked
# unpacked: a wrong archive failed only in `make fit`, or on the GPU machine after its start-up.
who=$1 archive=$2 folder=${3:-}
layout="expected train/<class>/<image>.jpg, as in the CIFAR-10 JPEG copy"
if [ -z "$folder" ] && [ -d "$archive" ]; then
    [ -d "$archive/train" ] || { echo "$who: $archive holds no train/ folder: $layout"; exit 2; }
    exit 0
fi
if [ -z "$folder" ]; then
    # The listing, not the unpacked files: 0.5 s for the 16 MB archive, nothing written. tar's and gzip's own lines
    # on a damaged archive (three) name neither the archive nor the remedy.
    names=$(tar -tzf "$archive" 2>/dev/null) \
        || { echo "$who: could not read '$archive': not a .tar.gz archive, or a damaged one"; exit 2; }
    printf '%s\n' "$names" | grep -q '^\(\./\)\{0,1\}train/' \
        || { echo "$who: '$archive' holds no train/ folder: $layout"; exit 2; }
    exit 0
fi
# Unpacked beside, then renamed: an interrupted unpack leaves no half-filled FOLDER.
rm -rf "$folder.partial" && mkdir -p "$folder.partial" || exit 2
echo "tar -xzf '$archive' -C $folder.partial"
tar -xzf "$archive" -C "$folder.partial" 2>/dev/null \
    || { rm -rf "$folder.partial"; echo "$who: could not unpack '$archive': not a .tar.gz archive, a damaged one, or the disk is full"; exit 2; }
[ -d "$folder.partial/train" ] \
    || { rm -rf "$folder.partial"; echo "$who: '$archive' holds no train/ folder: $layout"; exit 2; }
touch "$folder.partial/.unpacked"
rm -rf "$folder" && mv "$folder.partial" "$folder"
