//! Folders of PNG/JPEG pictures (CelebA-style): decoding, fitting to the target size by a
//! centre or random crops, and loading a whole folder in parallel.

use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageReader};
use rayon::prelude::*;

use super::shuffle::mix;
use super::{has_ext, read_dir_sorted, DataError, Dataset, MAX_PICTURE_BYTES};
use crate::rng::SplitMix64;

/// How to fit an image folder's pictures to the target size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Crop {
    /// Resize so the picture just covers the target (its short side becomes
    /// the target side), then take the centre. One image per picture.
    Center,
    /// `per_image` random crops of the target size from each picture after
    /// resizing its short side to `scale_to` pixels, deterministic from
    /// `seed` (independent of thread scheduling).
    Random {
        /// Crops taken from each picture.
        per_image: usize,
        /// Short side after resizing; at least the target's short side.
        scale_to: u32,
        /// Seed for the crop positions.
        seed: u64,
    },
}

pub(super) const IMAGE_EXTS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The pictures of a folder: every `*.png`, `*.jpg`, `*.jpeg` file
/// (case-insensitive), non-recursive, sorted by file name.
pub fn image_files_in(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(read_dir_sorted(dir)?
        .into_iter()
        .filter(|p| has_ext(p, &IMAGE_EXTS) && p.is_file())
        .collect())
}

fn decode_image(path: &Path) -> Result<DynamicImage, DataError> {
    let image_err = |e: image::ImageError| DataError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let mut decoder = reader.into_decoder().map_err(image_err)?;
    // Checked before anything is allocated: a few bytes of header can claim gigabytes.
    if decoder.total_bytes() > MAX_PICTURE_BYTES {
        let (w, h) = decoder.dimensions();
        return Err(DataError::Image {
            path: path.to_path_buf(),
            message: format!(
                "the picture claims {w}x{h} pixels ({} bytes decoded), over the {} MiB limit \
                 per picture (a corrupt header or a decompression bomb?); shrink it",
                decoder.total_bytes(),
                MAX_PICTURE_BYTES >> 20
            ),
        });
    }
    let orientation = decoder.orientation().map_err(image_err)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(image_err)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            message: format!("the picture is {}x{} pixels", img.width(), img.height()),
        });
    }
    Ok(img)
}

/// Size after scaling `(w, h)` so that it covers `(tw, th)` and its short
/// side is at least `short`.
fn cover_size(w: u32, h: u32, tw: u32, th: u32, short: u32) -> (u32, u32) {
    let (wf, hf) = (f64::from(w), f64::from(h));
    let s = (f64::from(tw) / wf)
        .max(f64::from(th) / hf)
        .max(f64::from(short) / wf.min(hf));
    let nw = ((wf * s).round() as u32).max(tw);
    let nh = ((hf * s).round() as u32).max(th);
    (nw, nh)
}

/// A decoded picture, converted and resized, ready to be cropped.
enum Fitted {
    Grey(image::GrayImage),
    Rgb(image::RgbImage),
}

impl Fitted {
    /// Copy the `tw x th` window at `(x, y)` into `slot`, channel-planar.
    fn crop_into(&self, slot: &mut [u8], x: u32, y: u32, tw: u32, th: u32) {
        match self {
            Fitted::Grey(grey) => {
                let sub = imageops::crop_imm(grey, x, y, tw, th).to_image();
                slot.copy_from_slice(sub.as_raw());
            }
            Fitted::Rgb(rgb) => {
                let plane = tw as usize * th as usize;
                let sub = imageops::crop_imm(rgb, x, y, tw, th).to_image();
                for (p, px) in sub.as_raw().chunks_exact(3).enumerate() {
                    slot[p] = px[0];
                    slot[plane + p] = px[1];
                    slot[2 * plane + p] = px[2];
                }
            }
        }
    }
}

/// Decode one picture and write its `crops` fitted images into `out`
/// (C x H x W each, back to back).
fn fit_picture(
    path: &Path,
    index: usize,
    channels: usize,
    tw: u32,
    th: u32,
    crop: &Crop,
    out: &mut [u8],
) -> Result<(), DataError> {
    let img = decode_image(path)?;
    let short = match crop {
        Crop::Center => 0,
        Crop::Random { scale_to, .. } => *scale_to,
    };
    let (nw, nh) = cover_size(img.width(), img.height(), tw, th, short);
    let same = (nw, nh) == (img.width(), img.height());
    // A very thin picture scaled to cover the target is enormous (1 x 2^20 pixels covering
    // 32x32 becomes 32 x 2^25): refuse before resizing. `imageops::resize` first resamples
    // vertically into an RGBA f32 buffer (16 bytes a pixel) of width x new height.
    let resized = u64::from(nw)
        .saturating_mul(u64::from(nh))
        .saturating_mul(channels as u64);
    let temp = u64::from(img.width())
        .saturating_mul(u64::from(nh))
        .saturating_mul(16);
    if !same && resized.max(temp) > MAX_PICTURE_BYTES {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            message: format!(
                "fitting the {}x{} picture to {tw}x{th} needs a {nw}x{nh} resize, over the \
                 {} MiB limit per picture (an extreme aspect ratio?); crop or remove it",
                img.width(),
                img.height(),
                MAX_PICTURE_BYTES >> 20
            ),
        });
    }
    let plane = tw as usize * th as usize;
    // Convert first so resizing works on 8-bit channels only.
    let fitted = if channels == 1 {
        let grey = img.to_luma8();
        Fitted::Grey(if same {
            grey
        } else {
            imageops::resize(&grey, nw, nh, FilterType::Triangle)
        })
    } else {
        let rgb = img.to_rgb8();
        Fitted::Rgb(if same {
            rgb
        } else {
            imageops::resize(&rgb, nw, nh, FilterType::Triangle)
        })
    };
    let write = |slot: &mut [u8], x: u32, y: u32| fitted.crop_into(slot, x, y, tw, th);
    let img_len = channels * plane;
    match crop {
        Crop::Center => write(out, (nw - tw) / 2, (nh - th) / 2),
        Crop::Random { seed, .. } => {
            let mut rng = SplitMix64::new(mix(*seed, index as u64));
            for slot in out.chunks_exact_mut(img_len) {
                let x = rng.below(u64::from(nw - tw) + 1) as u32;
                let y = rng.below(u64::from(nh - th) + 1) as u32;
                write(slot, x, y);
            }
        }
    }
    Ok(())
}

/// A folder of PNG/JPEG images (CelebA-style): every `*.png`/`*.jpg`/`*.jpeg`
/// (case-insensitive, sorted by name, non-recursive), converted to `channels`
/// (1 = luma grey, 3 = RGB; alpha is dropped), fitted to `height x width` by
/// `crop` (resizing with a triangle filter). Unreadable or corrupt files are
/// an error naming the file; a folder with no pictures is
/// [`DataError::Empty`]. Decodes in parallel with rayon; the result does not
/// depend on the number of threads. No labels.
pub fn load_image_folder(
    dir: &Path,
    channels: usize,
    height: usize,
    width: usize,
    crop: &Crop,
) -> Result<Dataset, DataError> {
    let cfg = |message: String| DataError::Config {
        path: dir.to_path_buf(),
        message,
    };
    if channels != 1 && channels != 3 {
        return Err(cfg(format!(
            "channels must be 1 (grey) or 3 (RGB), got {channels}"
        )));
    }
    let side = |v: usize, name: &str| -> Result<u32, DataError> {
        match u32::try_from(v) {
            Ok(s) if (1..=1 << 16).contains(&s) => Ok(s),
            _ => Err(cfg(format!(
                "image {name} must be between 1 and 65536 pixels, got {v}"
            ))),
        }
    };
    let th = side(height, "height")?;
    let tw = side(width, "width")?;
    let per_picture = match crop {
        Crop::Center => 1,
        Crop::Random {
            per_image,
            scale_to,
            ..
        } => {
            if *per_image == 0 {
                return Err(cfg(
                    "Crop::Random per_image is 0; ask for at least one crop per picture"
                        .to_string(),
                ));
            }
            if *scale_to > 1 << 14 {
                return Err(cfg(format!(
                    "Crop::Random scale_to {scale_to} is over 16384 pixels; \
                     use a smaller value (a little above the target size)"
                )));
            }
            if *scale_to < tw.min(th) {
                return Err(cfg(format!(
                    "Crop::Random scale_to {scale_to} is smaller than the {height}x{width} \
                     target; use scale_to >= {}",
                    tw.min(th)
                )));
            }
            *per_image
        }
    };

    let files = image_files_in(dir)?;
    if files.is_empty() {
        return Err(DataError::Empty {
            path: dir.to_path_buf(),
            reason: "no images (*.png, *.jpg, *.jpeg) in this folder; point at the folder \
                     that directly holds the pictures"
                .to_string(),
        });
    }
    let img_len = channels * height * width;
    let chunk = per_picture
        .checked_mul(img_len)
        .filter(|c| c.checked_mul(files.len()).is_some())
        .ok_or_else(|| {
            cfg(format!(
                "{} pictures x {per_picture} crops of {channels}x{height}x{width} do not fit \
                 in memory; use fewer crops or a smaller size",
                files.len()
            ))
        })?;
    let mut pixels = vec![0u8; chunk * files.len()];
    let results: Vec<Result<(), DataError>> = pixels
        .par_chunks_mut(chunk)
        .zip(files.par_iter())
        .enumerate()
        .map(|(i, (out, path))| fit_picture(path, i, channels, tw, th, crop, out))
        .collect();
    if let Some(err) = results.into_iter().find_map(Result::err) {
        return Err(err);
    }
    Ok(Dataset {
        channels,
        height,
        width,
        pixels,
        labels: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::io;
    use tempfile::TempDir;

    fn photo_random(seed: u64) -> Dataset {
        let crop = Crop::Random {
            per_image: 3,
            scale_to: 40,
            seed,
        };
        load_image_folder(&data("photos"), 3, 32, 32, &crop).unwrap()
    }

    #[test]
    fn photos_random_crop_count_and_determinism() {
        let a = photo_random(7);
        assert_eq!((a.len(), a.shape()), (15, (3, 32, 32)));
        assert!(a.labels.is_none());
        assert_eq!(a, photo_random(7));
        assert_ne!(a.pixels, photo_random(8).pixels);
        // Crops of one picture differ from each other.
        assert_ne!(a.image(0), a.image(1));
    }

    #[test]
    fn photos_center_crop() {
        let rgb = load_image_folder(&data("photos"), 3, 24, 32, &Crop::Center).unwrap();
        assert_eq!((rgb.len(), rgb.shape()), (5, (3, 24, 32)));
        let grey = load_image_folder(&data("photos"), 1, 16, 16, &Crop::Center).unwrap();
        assert_eq!((grey.len(), grey.shape()), (5, (1, 16, 16)));
        // Not all black: the pictures really were decoded.
        assert!(grey.pixels.iter().map(|&p| p as u64).sum::<u64>() > 5 * 256 * 20);
    }

    #[test]
    fn center_crop_takes_the_middle_and_planes_are_rgb() {
        // 90x20 picture: left third red, middle green, right third blue.
        // Scaled to 36x8, the centre 8x8 comes from source columns 35..55.
        let dir = TempDir::new().unwrap();
        let img = image::RgbImage::from_fn(90, 20, |x, _| match x / 30 {
            0 => image::Rgb([255, 0, 0]),
            1 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        img.save(dir.path().join("stripes.PNG")).unwrap();
        let ds = load_image_folder(dir.path(), 3, 8, 8, &Crop::Center).unwrap();
        assert_eq!((ds.len(), ds.shape()), (1, (3, 8, 8)));
        let im = ds.image(0);
        assert!(
            im[..64].iter().all(|&r| r < 10),
            "red plane {:?}",
            &im[..64]
        );
        assert!(im[64..128].iter().all(|&g| g > 245), "green plane");
        assert!(im[128..].iter().all(|&b| b < 10), "blue plane");
        let grey = load_image_folder(dir.path(), 1, 8, 8, &Crop::Center).unwrap();
        // Rec. 709 luma of pure green is about 0.7152 * 255 = 182.
        assert!(grey.pixels.iter().all(|&v| (170..195).contains(&v)));
    }

    #[test]
    fn corrupt_png_named() {
        let dir = TempDir::new().unwrap();
        let noise: Vec<u8> = (0..500u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        write(&dir, "x.png", &noise);
        assert_err(
            load_image_folder(dir.path(), 3, 8, 8, &Crop::Center),
            "x.png",
            "cannot decode",
        );
        // A PNG with a valid signature but cut short.
        let other = TempDir::new().unwrap();
        let mut png = Vec::new();
        image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]))
            .write_to(&mut io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        write(&other, "a_good.png", &png);
        write(&other, "b_cut.png", &png[..png.len() / 2]);
        assert_err(
            load_image_folder(other.path(), 3, 8, 8, &Crop::Center),
            "b_cut.png",
            "decode",
        );
    }

    #[test]
    fn empty_image_folder_and_bad_options() {
        let dir = TempDir::new().unwrap();
        write(&dir, "notes.txt", b"no pictures here");
        let name = dir.path().display().to_string();
        assert_err(
            load_image_folder(dir.path(), 3, 8, 8, &Crop::Center),
            &name,
            "no images",
        );
        assert_err(
            load_image_folder(dir.path(), 3, 8, 8, &Crop::Center),
            &name,
            "empty",
        );
        let photos = data("photos");
        assert_err(
            load_image_folder(&photos, 2, 8, 8, &Crop::Center),
            "photos",
            "channels must be 1",
        );
        assert_err(
            load_image_folder(&photos, 3, 0, 8, &Crop::Center),
            "photos",
            "height",
        );
        let crop = Crop::Random {
            per_image: 1,
            scale_to: 16,
            seed: 0,
        };
        assert_err(
            load_image_folder(&photos, 3, 32, 32, &crop),
            "photos",
            "scale_to",
        );
        let missing = dir.path().join("nope");
        assert_err(
            load_image_folder(&missing, 3, 8, 8, &Crop::Center),
            "nope",
            "cannot read",
        );
    }
}
