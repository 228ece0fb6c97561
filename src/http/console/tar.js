// A folder of images as one tar archive, for the upload of a picked or dropped folder: the
// service reads it like any uploaded tar (the same layout rules, limits and refusals).
//
// Written here rather than taken from a library: the archive is a Blob made of the headers and
// the File objects themselves, so the browser reads each photo from disk as the upload sends it.
// The tar libraries on npm build the whole archive in memory first, and a folder of photos is
// gigabytes.

const BLOCK = 512;
const encoder = new TextEncoder();

/** `value` as `width - 1` octal digits and a NUL, as tar writes numbers. */
function octal(value, width) {
  const digits = Math.floor(value).toString(8);
  if (digits.length > width - 1) throw new Error(`${value} does not fit a tar header`);
  return digits.padStart(width - 1, "0") + "\0";
}

/** A ustar header block: `name` (bytes, at most 100), `size` bytes of type `type`. */
function header(name, size, type, mtime) {
  const block = new Uint8Array(BLOCK);
  const put = (at, text) => block.set(encoder.encode(text), at);
  block.set(name, 0);
  put(100, "0000644\0"); // mode
  put(108, "0000000\0"); // uid
  put(116, "0000000\0"); // gid
  put(124, octal(size, 12));
  put(136, octal(mtime, 12));
  put(148, "        "); // the checksum counts its own field as spaces
  put(156, type);
  put(257, "ustar\0");
  put(263, "00");
  const sum = block.reduce((a, b) => a + b, 0);
  put(148, octal(sum, 7) + " ");
  return block;
}

/** Zero bytes up to the next block boundary after `size` bytes. */
function padding(size) {
  return new Uint8Array((BLOCK - (size % BLOCK)) % BLOCK);
}

/** A PAX extended-header record, `"<length> <key>=<value>\n"`, whose length counts itself. */
function paxRecord(key, value) {
  const rest = ` ${key}=${value}\n`;
  const size = encoder.encode(rest).length;
  let length = size + 1;
  while (String(length).length + size !== length) length = String(length).length + size;
  return encoder.encode(`${length}${rest}`);
}

/**
 * A tar archive (a Blob) of `entries`, each `{path, file}` with a relative `/`-separated path. A
 * path longer than the header's 100 bytes goes in a PAX record before its entry.
 */
export function tarOf(entries) {
  const parts = [];
  for (const { path, file } of entries) {
    const mtime = (file.lastModified || 0) / 1000;
    let name = encoder.encode(path);
    if (name.length > 100) {
      const record = paxRecord("path", path);
      parts.push(header(encoder.encode("././@PaxHeader"), record.length, "x", mtime), record, padding(record.length));
      name = encoder.encode("long-name"); // (read from the record instead)
    }
    parts.push(header(name, file.size, "0", mtime), file, padding(file.size));
  }
  parts.push(new Uint8Array(2 * BLOCK)); // the end of the archive
  return new Blob(parts, { type: "application/x-tar" });
}

/** The files of a dropped folder (a FileSystemDirectoryEntry), each `{path, file}`, depth-first. */
export async function filesOfEntry(entry) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    return [{ path: entry.fullPath.replace(/^\//, ""), file }];
  }
  const reader = entry.createReader();
  const children = [];
  // readEntries answers in batches until it answers none.
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (batch.length === 0) break;
    children.push(...batch);
  }
  children.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const files = [];
  for (const child of children) files.push(...(await filesOfEntry(child)));
  return files;
}
