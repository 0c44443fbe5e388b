//! Folder and Pascal VOC loaders on tiny fixtures written to a temporary folder, and
//! one test per documented error.

use std::io::Write;
use std::path::Path;

use datasets::{voc_palette, Dataset, Error, FolderDataset, Split, VocDataset, VOID, VOID_COLOUR};
use image::ColorType;

fn save(path: &Path, pixels: &[u8], w: u32, h: u32, colour: ColorType) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::save_buffer(path, pixels, w, h, colour).unwrap();
}

/// A 3x2 RGB image whose red channel is 10 * pixel index.
fn rgb_image(path: &Path) {
    let px: Vec<u8> = (0..6u8).flat_map(|i| [10 * i, 100, 200]).collect();
    save(path, &px, 3, 2, ColorType::Rgb8);
}

/// `root/images/{a.png, b.jpg}` with grey masks `root/masks/{a,b}.png` of 3 classes.
fn folder_fixture(root: &Path) {
    rgb_image(&root.join("images/a.png"));
    save(
        &root.join("images/b.jpg"),
        &[128; 6 * 3],
        3,
        2,
        ColorType::Rgb8,
    );
    save(
        &root.join("masks/a.png"),
        &[0, 1, 2, 255, 0, 1],
        3,
        2,
        ColorType::L8,
    );
    save(&root.join("masks/b.png"), &[2; 6], 3, 2, ColorType::L8);
    std::fs::write(root.join("images/notes.txt"), "not an image").unwrap();
}

#[test]
fn folder_loads_pairs_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    folder_fixture(dir.path());
    let ds = FolderDataset::open(dir.path(), 3).unwrap();
    assert_eq!((ds.len(), ds.num_classes(), ds.channels()), (2, 3, 3));
    let a = ds.get(0).unwrap();
    assert_eq!((a.channels, a.height, a.width), (3, 2, 3));
    assert_eq!(a.mask, vec![0, 1, 2, VOID, 0, 1]);
    // Planar layout: the red plane first, then green, then blue.
    assert!((a.image[1] - 10.0 / 255.0).abs() < 1e-6);
    assert!((a.image[6] - 100.0 / 255.0).abs() < 1e-6);
    assert!((a.image[12] - 200.0 / 255.0).abs() < 1e-6);
    let b = ds.get(1).unwrap();
    assert_eq!(b.mask, vec![2; 6]);
    assert!(
        b.image.iter().all(|v| (v - 128.0 / 255.0).abs() < 0.05),
        "JPEG decoded"
    );

    let grey = FolderDataset::open(dir.path(), 3)
        .unwrap()
        .with_channels(1)
        .unwrap();
    assert_eq!(grey.get(0).unwrap().image.len(), 6);
    assert!(ds.clone().with_channels(2).is_err());
    assert!(ds.get(2).is_err());
}

#[test]
fn folder_colour_masks_use_the_palette() {
    let dir = tempfile::tempdir().unwrap();
    rgb_image(&dir.path().join("images/a.png"));
    let p = voc_palette(3);
    let px: Vec<u8> = [p[0], p[1], p[2], VOID_COLOUR, p[1], p[0]].concat();
    save(&dir.path().join("masks/a.png"), &px, 3, 2, ColorType::Rgb8);
    let ds = FolderDataset::open(dir.path(), 3).unwrap();
    assert_eq!(ds.get(0).unwrap().mask, vec![0, 1, 2, VOID, 1, 0]);
}

fn message(err: Error) -> String {
    err.to_string()
}

#[test]
fn error_missing_mask_names_the_image() {
    let dir = tempfile::tempdir().unwrap();
    folder_fixture(dir.path());
    std::fs::remove_file(dir.path().join("masks/b.png")).unwrap();
    let err = FolderDataset::open(dir.path(), 3).unwrap_err();
    assert!(matches!(err, Error::MissingMask { .. }));
    let msg = message(err);
    assert!(
        msg.contains("missing mask") && msg.contains("b.jpg") && msg.contains("b.png"),
        "{msg}"
    );
}

#[test]
fn error_size_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    folder_fixture(dir.path());
    save(
        &dir.path().join("masks/a.png"),
        &[0; 4],
        2,
        2,
        ColorType::L8,
    );
    let msg = message(FolderDataset::open(dir.path(), 3).unwrap_err());
    assert!(
        msg.contains("size mismatch") && msg.contains("a.png") && msg.contains("2x3"),
        "{msg}"
    );
}

#[test]
fn error_corrupt_image_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    folder_fixture(dir.path());
    // A PNG signature followed by garbage: the header cannot be read.
    let mut f = std::fs::File::create(dir.path().join("images/a.png")).unwrap();
    f.write_all(b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    let msg = message(FolderDataset::open(dir.path(), 3).unwrap_err());
    assert!(msg.contains("a.png"), "{msg}");

    // A corrupt mask body, valid header: caught by `get`.
    let dir = tempfile::tempdir().unwrap();
    folder_fixture(dir.path());
    let mask = dir.path().join("masks/a.png");
    let mut bytes = std::fs::read(&mask).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 20);
    std::fs::write(&mask, bytes).unwrap();
    let ds = FolderDataset::open(dir.path(), 3).unwrap();
    let msg = message(ds.get(0).unwrap_err());
    assert!(
        msg.contains("masks/a.png") || msg.contains("masks\\a.png"),
        "{msg}"
    );
}

#[test]
fn error_mask_value_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    folder_fixture(dir.path());
    save(
        &dir.path().join("masks/b.png"),
        &[0, 0, 0, 0, 7, 0],
        3,
        2,
        ColorType::L8,
    );
    let ds = FolderDataset::open(dir.path(), 3).unwrap();
    let err = ds.get(1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MaskValue {
                value: 7,
                row: 1,
                col: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = message(err);
    assert!(msg.contains("b.png") && msg.contains('7'), "{msg}");
}

#[test]
fn error_mask_colour_not_in_palette() {
    let dir = tempfile::tempdir().unwrap();
    rgb_image(&dir.path().join("images/a.png"));
    save(
        &dir.path().join("masks/a.png"),
        &[[1u8, 2, 3]; 6].concat(),
        3,
        2,
        ColorType::Rgb8,
    );
    let msg = message(
        FolderDataset::open(dir.path(), 3)
            .unwrap()
            .get(0)
            .unwrap_err(),
    );
    assert!(
        msg.contains("a.png") && msg.contains("[1, 2, 3]") && msg.contains("palette"),
        "{msg}"
    );
}

#[test]
fn error_missing_images_folder() {
    let dir = tempfile::tempdir().unwrap();
    let msg = message(FolderDataset::open(dir.path(), 3).unwrap_err());
    assert!(msg.contains("images"), "{msg}");
    assert!(FolderDataset::open(dir.path(), 0).is_err());
}

/// Writes an 8-bit palette PNG (colour type 3) by hand, as the VOC files are, since
/// the `image` crate only writes RGB.
fn palette_png(path: &Path, indices: &[u8], w: usize, palette: &[[u8; 3]]) {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    }
    let h = indices.len() / w;
    let mut ihdr = Vec::new();
    ihdr.extend((w as u32).to_be_bytes());
    ihdr.extend((h as u32).to_be_bytes());
    ihdr.extend([8, 3, 0, 0, 0]);
    let mut raw = Vec::new();
    for row in indices.chunks(w) {
        raw.push(0);
        raw.extend(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).unwrap();
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"PLTE", &palette.concat());
    chunk(&mut png, b"IDAT", &z.finish().unwrap());
    chunk(&mut png, b"IEND", &[]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, png).unwrap();
}

/// A VOC tree with ids `a` (train) and `b` (val).
fn voc_fixture(root: &Path) {
    let mut palette = voc_palette(256);
    palette[255] = VOID_COLOUR;
    for id in ["a", "b"] {
        save(
            &root.join(format!("JPEGImages/{id}.jpg")),
            &[90; 6 * 3],
            3,
            2,
            ColorType::Rgb8,
        );
        palette_png(
            &root.join(format!("SegmentationClass/{id}.png")),
            &[0, 15, 15, 255, 20, 0],
            3,
            &palette,
        );
    }
    let sets = root.join("ImageSets/Segmentation");
    std::fs::create_dir_all(&sets).unwrap();
    std::fs::write(sets.join("train.txt"), "a\n").unwrap();
    std::fs::write(sets.join("val.txt"), "b\n\n").unwrap();
}

#[test]
fn voc_maps_palette_pngs_to_indices() {
    let dir = tempfile::tempdir().unwrap();
    voc_fixture(dir.path());
    for split in [Split::Train, Split::Val] {
        let ds = VocDataset::open(dir.path(), split).unwrap();
        assert_eq!((ds.len(), ds.num_classes(), ds.channels()), (1, 21, 3));
        let s = ds.get(0).unwrap();
        assert_eq!(s.mask, vec![0, 15, 15, VOID, 20, 0]);
        assert_eq!(s.image.len(), 18);
    }
    assert_eq!(
        VocDataset::open(dir.path(), Split::Val)
            .unwrap()
            .class_names()[15],
        "person"
    );
    assert!(VocDataset::open(dir.path(), Split::Test).is_err());
}

#[test]
fn voc_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    voc_fixture(dir.path());
    // A palette index past the 21 VOC classes: its colour is not a VOC class colour.
    palette_png(
        &dir.path().join("SegmentationClass/a.png"),
        &[0, 1, 2, 3, 4, 40],
        3,
        &voc_palette(256),
    );
    let ds = VocDataset::open(dir.path(), Split::Train).unwrap();
    let msg = message(ds.get(0).unwrap_err());
    assert!(
        msg.contains("a.png") && msg.contains("row 1, col 2"),
        "{msg}"
    );

    std::fs::remove_file(dir.path().join("SegmentationClass/b.png")).unwrap();
    let msg = message(VocDataset::open(dir.path(), Split::Val).unwrap_err());
    assert!(
        msg.contains("missing mask") && msg.contains("b.jpg"),
        "{msg}"
    );

    std::fs::remove_file(dir.path().join("ImageSets/Segmentation/train.txt")).unwrap();
    let msg = message(VocDataset::open(dir.path(), Split::Train).unwrap_err());
    assert!(msg.contains("train.txt"), "{msg}");
}
