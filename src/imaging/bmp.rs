//! 16-bit BMPs as Pillow reads them: each 5- or 6-bit channel scaled to 0–255 by `v * 255 / max`,
//! truncating (Pillow's `BGR;15` and `BGR;16` unpackers). The image crate rounds instead, which
//! put half the samples of such a file a level off; other BMPs it reads as Pillow does, sample
//! for sample (`bench/QUALITY.md`), and reads them still.
//!
//! Pillow reads two layouts, and so does this: 5 bits a channel (`BI_RGB`, or bit fields
//! 0x7C00, 0x3E0, 0x1F) and 5-6-5 (bit fields 0xF800, 0x7E0, 0x1F). Other bit fields are refused
//! by name, as Pillow refuses them.

use image::RgbImage;

use super::ImageError;

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Whether `bytes` are a BMP of 16 bits a pixel with one of the headers Pillow reads.
pub(super) fn is_16_bit(bytes: &[u8]) -> bool {
    bytes.starts_with(b"BM") && u32_at(bytes, 14).is_some_and(|h| [40, 52, 56, 64, 108, 124].contains(&h)) && u16_at(bytes, 28) == Some(16)
}

/// Decodes a 16-bit BMP ([`is_16_bit`]) whose size the image crate's header reader gave as
/// `width` × `height`.
pub(super) fn decode_16(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, ImageError> {
    let corrupt = |why: &str| ImageError::Corrupt(format!("the BMP's {why}"));
    let (Some(offset), Some(stored_height), Some(compression)) = (u32_at(bytes, 10), u32_at(bytes, 22), u32_at(bytes, 30)) else {
        return Err(corrupt("header ends early"));
    };
    // Bits of red, green and blue, most significant first in each pixel's 16.
    let green_bits = match compression {
        0 => 5,
        3 => match [54, 58, 62].map(|at| u32_at(bytes, at)) {
            [Some(0x7C00), Some(0x3E0), Some(0x1F)] => 5,
            [Some(0xF800), Some(0x7E0), Some(0x1F)] => 6,
            [Some(r), Some(g), Some(b)] => {
                return Err(ImageError::Unsupported(format!("a 16-bit BMP of colour masks {r:#x}, {g:#x}, {b:#x}; save it as PNG")));
            }
            _ => return Err(corrupt("colour masks are cut short")),
        },
        other => return Err(ImageError::Unsupported(format!("a 16-bit BMP of compression {other}; save it as PNG"))),
    };
    let top_down = (stored_height as i32) < 0;
    let stride = (width as usize * 16).div_ceil(32) * 4;
    let rows = usize::try_from(offset)
        .ok()
        .and_then(|start| bytes.get(start..start.checked_add(stride * height as usize)?))
        .ok_or_else(|| corrupt("pixels are cut short"))?;
    let scale = |v: u16, bits: u32| (u32::from(v) * 255 / ((1 << bits) - 1)) as u8;
    Ok(RgbImage::from_fn(width, height, |x, y| {
        let row = if top_down { y } else { height - 1 - y } as usize;
        let at = row * stride + 2 * x as usize;
        let p = u16::from_le_bytes([rows[at], rows[at + 1]]);
        let green = (p >> 5) & ((1 << green_bits) - 1);
        image::Rgb([scale((p >> (5 + green_bits)) & 0x1F, 5), scale(green, green_bits), scale(p & 0x1F, 5)])
    }))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixtures() -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bmp")
    }

    /// 16-bit BMPs of every layout Pillow reads, and the kinds the image crate reads (palettes,
    /// run-length coding, 24 and 32 bits), decoded sample for sample as transformers gets them
    /// from Pillow (`tests/fixtures/make_bmp_refs.py` wrote the references).
    #[test]
    fn every_kind_of_bmp_decodes_to_pillow_s_pixels() {
        super::super::assert_fixture_folder_decodes_as_pillow_does(&fixtures(), 13);
    }

    /// Bit fields Pillow does not read are refused by name; pixels cut short as corrupt.
    #[test]
    fn a_16_bit_bmp_pillow_does_not_read_is_refused_with_a_reason() {
        let decode = |name: &str| super::super::decode_rgb(&std::fs::read(fixtures().join(name)).unwrap(), 1 << 20);
        assert_eq!(
            decode("refused-rgb444.bmp"),
            Err(ImageError::Unsupported("a 16-bit BMP of colour masks 0xf00, 0xf0, 0xf; save it as PNG".into()))
        );
        assert_eq!(decode("refused-cut-short.bmp"), Err(ImageError::Corrupt("the BMP's pixels are cut short".into())));
        let mut bytes = std::fs::read(fixtures().join("rgb565-bitfields.bmp")).unwrap();
        bytes[30] = 6; // BI_ALPHABITFIELDS, refused by the image crate's header reader already
        let refused = super::super::decode_rgb(&bytes, 1 << 20);
        assert!(matches!(&refused, Err(ImageError::Corrupt(why)) if why.contains("compression type 6")), "{refused:?}");
        assert!(!is_16_bit(&bytes[..29]), "a header cut short is left to the image crate to refuse");
    }
}
