//! Regression tests for problems found with the fuzz targets in `tools/fuzz` (see its
//! README). Each test feeds the input that failed, stored under `tests/fixtures/fuzz/`.

use std::path::Path;

use clayflow_trainer::data::{load_image_folder, Crop, DataError};

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A folder holding only `bytes` as `name`.
fn folder_with(name: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(name), bytes).unwrap();
    dir
}

/// `image_folder` target: a 2 KB PNG of 1 x 1,048,576 pixels (and its 1,048,576 x 1 twin)
/// decodes to only 1 MiB, but covering a 32x32 target scales it to 32 x 33,554,432: the
/// loader allocated 3 GiB (libFuzzer: out-of-memory, malloc(3221225472)) and ran for over
/// a minute. It must be refused with an error naming the file and the limit.
#[test]
fn extreme_aspect_ratio_picture_is_refused_before_resizing() {
    for name in ["image-tall-1x1048576.png", "image-wide-1048576x1.png"] {
        let dir = folder_with(name, &fixture(name));
        for (channels, crop) in [
            (3, Crop::Center),
            (
                1,
                Crop::Random {
                    per_image: 2,
                    scale_to: 40,
                    seed: 1,
                },
            ),
        ] {
            let err = load_image_folder(dir.path(), channels, 32, 32, &crop)
                .expect_err("a 1 x 2^20 picture fitted to 32x32 must be refused");
            assert!(matches!(err, DataError::Image { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(name), "error does not name the file: {msg}");
            assert!(
                msg.contains("MiB limit"),
                "error does not name the limit: {msg}"
            );
            assert!(
                msg.contains("resize"),
                "error does not say what is too big: {msg}"
            );
        }
    }
}

/// The limit is on the resized size, not on thinness: a 3 x 2000 strip (32 x 21,333 after
/// fitting, 2 MB) still loads.
#[test]
fn thin_but_reasonable_picture_still_loads() {
    let img = image::GrayImage::from_fn(3, 2000, |x, y| image::Luma([((x * 7 + y) % 256) as u8]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let dir = folder_with("strip.png", png.get_ref());
    let ds = load_image_folder(dir.path(), 1, 32, 32, &Crop::Center).unwrap();
    assert_eq!((ds.len(), ds.shape()), (1, (1, 32, 32)));
}
