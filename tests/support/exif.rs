//! EXIF blocks for test images. Shared by the test binaries (through `support`) and the library's
//! own unit tests (`src/imaging.rs` includes this file by its path), so it uses nothing but std.

/// A little-endian EXIF (TIFF) block holding only an orientation (1–8: 6 is a quarter turn
/// clockwise, as a phone stores a portrait photo).
pub fn orientation(value: u16) -> Vec<u8> {
    let mut exif = b"II*\0".to_vec();
    exif.extend(8u32.to_le_bytes()); // the first directory's offset
    exif.extend(1u16.to_le_bytes()); // one entry
    exif.extend(0x0112u16.to_le_bytes()); // Orientation
    exif.extend(3u16.to_le_bytes()); // SHORT
    exif.extend(1u32.to_le_bytes()); // one value
    exif.extend(value.to_le_bytes());
    exif.extend([0, 0]);
    exif.extend(0u32.to_le_bytes()); // no next directory
    exif
}
