//! Fuzzes image decoding: every image the service reads (uploads, training, `/predict`) goes
//! through `decode_rgb`. A panic, a hang, a sanitizer report or a decoded image larger than the
//! pixel limit is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

const MAX_PIXELS: u64 = 4_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = vitforge::imaging::decode_rgb(data, MAX_PIXELS) {
        let (w, h) = img.dimensions();
        assert!(w > 0 && h > 0);
        assert!(u64::from(w) * u64::from(h) <= MAX_PIXELS, "decoded {w}×{h}, over the limit");
        assert_eq!(img.as_raw().len(), w as usize * h as usize * 3);
    }
});
