//! Sample grids: a batch of `N x C x H x W` images laid out in a padded, upscaled grid and
//! written as a PNG.

use std::path::Path;

use super::{write_atomic, ReportError};

/// Colour of the border between and around the images in a grid.
pub const GRID_PAD_COLOUR: [u8; 3] = [64, 64, 64];

/// Lays out `n` images stored `N x C x H x W` (channel-planar `u8`) in a grid.
///
/// `channels` is 1 (grey, drawn as equal R, G and B) or 3 (RGB planes).
/// Images are placed row-major with `cols` columns (clamped to `n`, so a
/// short batch does not leave a wide empty strip), each upscaled by
/// nearest neighbour by the factor `upscale`, with `pad` pixels of dark grey
/// ([`GRID_PAD_COLOUR`]) between and around them. Unused cells in the last
/// row are dark grey too.
///
/// Image `k` has its top-left pixel at
/// `x = pad + (k % cols) * (width * upscale + pad)`,
/// `y = pad + (k / cols) * (height * upscale + pad)`.
///
/// Errors: [`ReportError::Length`] if `pixels.len() != n * channels * height *
/// width`, [`ReportError::ZeroSize`] if `n`, `height`, `width`, `cols` or
/// `upscale` is zero, [`ReportError::Channels`] for a channel count other
/// than 1 or 3, [`ReportError::TooLarge`] if the grid does not fit a PNG.
#[allow(clippy::too_many_arguments)]
pub fn image_grid(
    pixels: &[u8],
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    cols: usize,
    pad: usize,
    upscale: usize,
) -> Result<image::RgbImage, ReportError> {
    if channels != 1 && channels != 3 {
        return Err(ReportError::Channels(channels));
    }
    for (what, v) in [
        ("n", n),
        ("height", height),
        ("width", width),
        ("cols", cols),
        ("upscale", upscale),
    ] {
        if v == 0 {
            return Err(ReportError::ZeroSize { what });
        }
    }
    let expected = n
        .checked_mul(channels)
        .and_then(|v| v.checked_mul(height))
        .and_then(|v| v.checked_mul(width));
    if expected != Some(pixels.len()) {
        return Err(ReportError::Length {
            got: pixels.len(),
            expected: expected.unwrap_or(usize::MAX),
            n,
            channels,
            height,
            width,
        });
    }

    let cols = cols.min(n);
    let rows = n.div_ceil(cols);
    // cell = upscaled image plus the pad to its right / below it.
    let dims = (|| {
        let cell_w = width.checked_mul(upscale)?.checked_add(pad)?;
        let cell_h = height.checked_mul(upscale)?.checked_add(pad)?;
        let grid_w = cols.checked_mul(cell_w)?.checked_add(pad)?;
        let grid_h = rows.checked_mul(cell_h)?.checked_add(pad)?;
        Some((cell_w, cell_h, grid_w, grid_h))
    })();
    let too_large = || ReportError::TooLarge {
        width: cols
            .saturating_mul(width.saturating_mul(upscale).saturating_add(pad))
            .saturating_add(pad),
        height: rows
            .saturating_mul(height.saturating_mul(upscale).saturating_add(pad))
            .saturating_add(pad),
    };
    let (cell_w, cell_h, grid_w, grid_h) = dims.ok_or_else(too_large)?;
    let (Ok(gw32), Ok(gh32)) = (u32::try_from(grid_w), u32::try_from(grid_h)) else {
        return Err(too_large());
    };
    let stride = grid_w.checked_mul(3).ok_or_else(too_large)?;
    let total = stride.checked_mul(grid_h).ok_or_else(too_large)?;
    // Refuse absurd allocations (> 1 GiB) instead of aborting on OOM.
    if total > 1 << 30 {
        return Err(too_large());
    }

    let mut buf = Vec::with_capacity(total);
    for _ in 0..grid_w * grid_h {
        buf.extend_from_slice(&GRID_PAD_COLOUR);
    }

    let plane = height * width;
    let row_bytes = width * upscale * 3;
    let mut line = vec![0u8; row_bytes];
    for k in 0..n {
        let img = &pixels[k * channels * plane..(k + 1) * channels * plane];
        let x0 = pad + (k % cols) * cell_w;
        let y0 = pad + (k / cols) * cell_h;
        for y in 0..height {
            // Build one upscaled output row, then copy it `upscale` times.
            for x in 0..width {
                let src = y * width + x;
                let rgb = if channels == 1 {
                    [img[src]; 3]
                } else {
                    [img[src], img[plane + src], img[2 * plane + src]]
                };
                for dx in 0..upscale {
                    let o = (x * upscale + dx) * 3;
                    line[o..o + 3].copy_from_slice(&rgb);
                }
            }
            for dy in 0..upscale {
                let off = (y0 + y * upscale + dy) * stride + x0 * 3;
                buf[off..off + row_bytes].copy_from_slice(&line);
            }
        }
    }
    image::RgbImage::from_raw(gw32, gh32, buf).ok_or_else(too_large)
}

/// Writes an RGB image as a PNG, atomically (temporary file + rename).
pub fn write_png(path: impl AsRef<Path>, img: &image::RgbImage) -> Result<(), ReportError> {
    use image::ImageEncoder as _;
    let path = path.as_ref();
    write_atomic(path, |w| {
        image::codecs::png::PngEncoder::new(w)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|source| ReportError::Encode {
                path: path.to_path_buf(),
                source,
            })
    })
}

/// [`image_grid`] followed by [`write_png`]: writes the grid as a PNG at
/// `path`, atomically, so a crash never leaves a half-written PNG.
#[allow(clippy::too_many_arguments)]
pub fn write_png_grid(
    path: impl AsRef<Path>,
    pixels: &[u8],
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    cols: usize,
    pad: usize,
    upscale: usize,
) -> Result<(), ReportError> {
    let img = image_grid(pixels, n, channels, height, width, cols, pad, upscale)?;
    write_png(path, &img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const PAD: [u8; 3] = GRID_PAD_COLOUR;

    fn px(img: &image::RgbImage, x: usize, y: usize) -> [u8; 3] {
        img.get_pixel(x as u32, y as u32).0
    }

    // ---- image grid ----

    #[test]
    fn grid_dimensions() {
        // 5 grey 2x3 images (h=2, w=3), 2 columns, pad 1, upscale 4.
        let pixels = vec![0u8; 5 * 2 * 3];
        let img = image_grid(&pixels, 5, 1, 2, 3, 2, 1, 4).unwrap();
        // width: 2 cells of 3*4 + 3 pads; height: 3 rows of 2*4 + 4 pads.
        assert_eq!(img.dimensions(), (2 * 12 + 3, 3 * 8 + 4));
        // Columns clamp to n.
        let img = image_grid(&pixels, 5, 1, 2, 3, 100, 0, 1).unwrap();
        assert_eq!(img.dimensions(), (15, 2));
    }

    #[test]
    fn grey_pixel_placement_upscaled_and_padded() {
        let (n, h, w, cols, pad, up) = (5, 4, 3, 2, 2, 3);
        let mut pixels = vec![0u8; n * h * w];
        // Image k has value 10 + k at (y=1, x=2) and 200 elsewhere on row 3.
        for k in 0..n {
            pixels[k * h * w + w + 2] = 10 + k as u8;
            for x in 0..w {
                pixels[k * h * w + 3 * w + x] = 200;
            }
        }
        let img = image_grid(&pixels, n, 1, h, w, cols, pad, up).unwrap();
        for k in 0..n {
            let x0 = pad + (k % cols) * (w * up + pad);
            let y0 = pad + (k / cols) * (h * up + pad);
            let v = 10 + k as u8;
            for dy in 0..up {
                for dx in 0..up {
                    assert_eq!(
                        px(&img, x0 + 2 * up + dx, y0 + up + dy),
                        [v; 3],
                        "image {k}"
                    );
                }
            }
            // Neighbouring source pixels are 0 and the blocks do not bleed.
            assert_eq!(px(&img, x0 + 2 * up - 1, y0 + up), [0; 3]);
            assert_eq!(px(&img, x0 + 2 * up, y0 + up - 1), [0; 3]);
            assert_eq!(px(&img, x0 + 2 * up, y0 + 2 * up), [0; 3]);
            // The image's top-left corner is image content, the pixel before it is pad.
            assert_eq!(px(&img, x0, y0), [0; 3]);
            assert_eq!(px(&img, x0 - 1, y0), PAD);
            assert_eq!(px(&img, x0, y0 - 1), PAD);
            // Last upscaled row is the source row 3.
            assert_eq!(px(&img, x0 + w * up - 1, y0 + h * up - 1), [200; 3]);
            assert_eq!(px(&img, x0 + w * up, y0 + h * up - 1), PAD);
            assert_eq!(px(&img, x0, y0 + h * up), PAD);
        }
        // The unused cell (row 2, col 1) is all pad.
        let x0 = pad + (w * up + pad);
        let y0 = pad + 2 * (h * up + pad);
        for y in y0..y0 + h * up {
            for x in x0..x0 + w * up {
                assert_eq!(px(&img, x, y), PAD);
            }
        }
        // Outer border.
        assert_eq!(px(&img, 0, 0), PAD);
        let (gw, gh) = img.dimensions();
        assert_eq!(px(&img, gw as usize - 1, gh as usize - 1), PAD);
    }

    #[test]
    fn rgb_planes_land_in_channels() {
        let (n, h, w) = (2, 2, 2);
        let plane = h * w;
        let mut pixels = vec![0u8; n * 3 * plane];
        for k in 0..n {
            let base = k * 3 * plane;
            // (y=1, x=0): R = 11+k, G = 22+k, B = 33+k.
            pixels[base + 2] = 11 + k as u8;
            pixels[base + plane + 2] = 22 + k as u8;
            pixels[base + 2 * plane + 2] = 33 + k as u8;
            // (y=0, x=1): pure green.
            pixels[base + plane + 1] = 255;
        }
        let (pad, up) = (1, 2);
        let img = image_grid(&pixels, n, 3, h, w, 2, pad, up).unwrap();
        for k in 0..n {
            let x0 = pad + k * (w * up + pad);
            let y0 = pad;
            let k8 = k as u8;
            assert_eq!(px(&img, x0 + 1, y0 + 3), [11 + k8, 22 + k8, 33 + k8]);
            assert_eq!(px(&img, x0 + 2, y0), [0, 255, 0]);
            assert_eq!(px(&img, x0 + 3, y0 + 1), [0, 255, 0]);
            assert_eq!(px(&img, x0, y0), [0, 0, 0]);
        }
    }

    #[test]
    fn grid_errors() {
        let p = vec![0u8; 2 * 3 * 4];
        assert!(matches!(
            image_grid(&p, 2, 1, 3, 2, 2, 1, 1),
            Err(ReportError::Length {
                got: 24,
                expected: 12,
                ..
            })
        ));
        assert!(matches!(
            image_grid(&p[..23], 2, 3, 1, 4, 2, 1, 1),
            Err(ReportError::Length {
                got: 23,
                expected: 24,
                ..
            })
        ));
        assert!(matches!(
            image_grid(&p, 2, 2, 3, 2, 2, 1, 1),
            Err(ReportError::Channels(2))
        ));
        assert!(matches!(
            image_grid(&p, 1, 4, 3, 2, 2, 1, 1),
            Err(ReportError::Channels(4))
        ));
        for (args, what) in [
            ((0, 3, 4, 2, 1), "n"),
            ((2, 0, 4, 2, 1), "height"),
            ((2, 3, 0, 2, 1), "width"),
            ((2, 3, 4, 0, 1), "cols"),
            ((2, 3, 4, 2, 0), "upscale"),
        ] {
            let (n, h, w, c, u) = args;
            match image_grid(&[], n, 1, h, w, c, 0, u) {
                Err(ReportError::ZeroSize { what: got }) => assert_eq!(got, what),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(matches!(
            image_grid(&[0; 1], 1, 1, 1, 1, 1, usize::MAX, 1),
            Err(ReportError::TooLarge { .. })
        ));
        assert!(matches!(
            image_grid(&[0; 1], 1, 1, 1, 1, 1, 0, 1 << 20),
            Err(ReportError::TooLarge { .. })
        ));
        let msg = image_grid(&p, 2, 1, 3, 2, 2, 1, 1).unwrap_err().to_string();
        assert!(msg.contains("24") && msg.contains("12"), "{msg}");
    }

    #[test]
    fn png_written_atomically_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples.png");
        let (n, h, w) = (6, 28, 28);
        let pixels: Vec<u8> = (0..n * h * w).map(|i| (i % 251) as u8).collect();
        write_png_grid(&path, &pixels, n, 1, h, w, 4, 2, 3).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (4 * (84 + 2) + 2, 2 * (84 + 2) + 2));
        let expect = image_grid(&pixels, n, 1, h, w, 4, 2, 3).unwrap();
        assert_eq!(img, expect);
        // Overwrite works and leaves no temporary files behind.
        write_png_grid(&path, &pixels, n, 1, h, w, 3, 0, 1).unwrap();
        assert_eq!(image::open(&path).unwrap().width(), 3 * 28);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn png_io_error_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("grid.png");
        let err = write_png_grid(&path, &[1, 2, 3, 4], 1, 1, 2, 2, 1, 1, 1).unwrap_err();
        assert!(matches!(err, ReportError::Io { .. }));
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        // Bad arguments fail before touching the file system.
        let path = dir.path().join("bad.png");
        assert!(write_png_grid(&path, &[1, 2, 3], 1, 1, 2, 2, 1, 1, 1).is_err());
        assert!(!path.exists());
    }

    // ---- metrics log ----
}
