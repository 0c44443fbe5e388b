//! Turning the Colin27 T1 volume and the AAL atlas into [`PreparedSlices`]: merging the
//! 116 AAL regions into 15 classes, downsampling axial slices to 2 mm and padding them.
//!
//! Run by `cargo run -p datasets --example prepare_brain -- --deb-dir DIR`; kept in the
//! library so the steps are unit-tested.

use std::path::Path;

use super::format::PreparedSlices;
use super::CLASS_NAMES;
use crate::nifti::NiftiVolume;
use crate::{Error, Result};

/// In-plane downsampling factor: 1 mm voxels to 2 mm pixels.
pub const FACTOR: usize = 2;
/// Height of a prepared slice: 109 rows of 2 mm (217 mm anterior-posterior) padded to
/// a multiple of 16.
pub const HEIGHT: usize = 112;
/// Width of a prepared slice: 91 columns of 2 mm (181 mm left-right) padded to a
/// multiple of 16.
pub const WIDTH: usize = 96;

/// The class (index into [`CLASS_NAMES`]) of an AAL region name, or `None` for a name
/// that fits no class. Matching is by name prefix:
///
/// | class | AAL regions |
/// |---|---|
/// | 1 frontal | Precentral, Frontal_*, Rolandic_Oper, Supp_Motor_Area, Olfactory, Rectus |
/// | 2 parietal | Postcentral, Parietal_*, SupraMarginal, Angular, Precuneus, Paracentral_Lobule |
/// | 3 temporal | Temporal_*, Heschl |
/// | 4 occipital | Calcarine, Cuneus, Lingual, Occipital_*, Fusiform |
/// | 5 cingulate | Cingulum_* |
/// | 6 insula | Insula |
/// | 7 hippocampal | Hippocampus, ParaHippocampal |
/// | 8 amygdala .. 12 thalamus | Amygdala, Caudate, Putamen, Pallidum, Thalamus |
/// | 13 cerebellum | Cerebelum_* (AAL's spelling) |
/// | 14 vermis | Vermis_* |
pub fn aal_class(name: &str) -> Option<u8> {
    const RULES: [(u8, &[&str]); 14] = [
        (
            1,
            &[
                "Precentral",
                "Frontal_",
                "Rolandic",
                "Supp_Motor",
                "Olfactory",
                "Rectus",
            ],
        ),
        (
            2,
            &[
                "Postcentral",
                "Parietal_",
                "SupraMarginal",
                "Angular",
                "Precuneus",
                "Paracentral",
            ],
        ),
        (3, &["Temporal_", "Heschl"]),
        (
            4,
            &["Calcarine", "Cuneus", "Lingual", "Occipital_", "Fusiform"],
        ),
        (5, &["Cingulum"]),
        (6, &["Insula"]),
        (7, &["Hippocampus", "ParaHippocampal"]),
        (8, &["Amygdala"]),
        (9, &["Caudate"]),
        (10, &["Putamen"]),
        (11, &["Pallidum"]),
        (12, &["Thalamus"]),
        (13, &["Cerebelum_"]),
        (14, &["Vermis"]),
    ];
    RULES
        .iter()
        .find(|(_, prefixes)| prefixes.iter().any(|p| name.starts_with(p)))
        .map(|(class, _)| *class)
}

/// Parses MRIcron's `aal.nii.txt` (lines `"<value> <name> <code>"`) into a lookup
/// table from atlas voxel value to class: entry `v` is the class of value `v`
/// (0 = background), `None` for values the file does not list.
pub fn aal_lookup(text: &str, path: &Path) -> Result<Vec<Option<u8>>> {
    let mut lut = vec![None; 256];
    lut[0] = Some(0);
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let (Some(value), Some(name)) = (fields.next(), fields.next()) else {
            continue;
        };
        let bad = |msg: String| Error::format(path, format!("line {}: {msg}", n + 1));
        let value: usize = value
            .parse()
            .map_err(|_| bad(format!("{value:?} is not a region number")))?;
        if !(1..256).contains(&value) {
            return Err(bad(format!("region number {value} is not in 1..=255")));
        }
        let class = aal_class(name).ok_or_else(|| bad(format!("region {name:?} fits no class")))?;
        lut[value] = Some(class);
    }
    Ok(lut)
}

/// Block mean of a 2-D grid: `grid` f32 `[ny, nx]` (x fastest) to
/// `[ceil(ny / f), ceil(nx / f)]`, treating voxels past the edge as 0.
pub fn downsample_mean(grid: &[f32], nx: usize, ny: usize, f: usize) -> Vec<f32> {
    let (dx, dy) = (nx.div_ceil(f), ny.div_ceil(f));
    let mut out = vec![0f32; dx * dy];
    for y in 0..ny {
        for x in 0..nx {
            out[(y / f) * dx + x / f] += grid[y * nx + x];
        }
    }
    let area = (f * f) as f32;
    out.iter_mut().for_each(|v| *v /= area);
    out
}

/// Block majority of a 2-D label grid: `labels` u8 `[ny, nx]` (x fastest, values
/// `< num_classes`) to `[ceil(ny / f), ceil(nx / f)]`, voxels past the edge counting
/// as background 0. Ties go to the highest class index: the high indices are the small
/// deep structures (amygdala, pallidum, ...), which a tie towards background would
/// erode away at 2 mm.
pub fn downsample_majority(
    labels: &[u8],
    nx: usize,
    ny: usize,
    f: usize,
    num_classes: usize,
) -> Vec<u8> {
    let (dx, dy) = (nx.div_ceil(f), ny.div_ceil(f));
    let mut out = vec![0u8; dx * dy];
    let mut votes = vec![0usize; num_classes];
    for by in 0..dy {
        for bx in 0..dx {
            votes.iter_mut().for_each(|v| *v = 0);
            let mut inside = 0;
            for y in by * f..((by + 1) * f).min(ny) {
                for x in bx * f..((bx + 1) * f).min(nx) {
                    if let Some(v) = votes.get_mut(labels[y * nx + x] as usize) {
                        *v += 1;
                    }
                    inside += 1;
                }
            }
            votes[0] += f * f - inside;
            let best = votes.iter().copied().max().unwrap_or(0);
            out[by * dx + bx] = votes.iter().rposition(|&v| v == best).unwrap_or(0) as u8;
        }
    }
    out
}

/// Prepares the axial slices of `t1` (intensities 0..=255) and `atlas` (AAL region
/// numbers, mapped to classes with `lut` from [`aal_lookup`]) that contain at least one
/// labelled voxel.
///
/// Each slice is downsampled by [`FACTOR`] in-plane (intensities by block mean, rounded;
/// labels by [`downsample_majority`]), flipped so anterior is at the top (row 0) with the
/// subject's left at the left (the atlas grid's x axis runs left to right, y posterior
/// to anterior), and centred in a [`HEIGHT`] × [`WIDTH`] frame padded with background.
pub fn prepare_slices(
    t1: &NiftiVolume,
    atlas: &NiftiVolume,
    lut: &[Option<u8>],
) -> Result<PreparedSlices> {
    if t1.dims != atlas.dims {
        return Err(Error::Config(format!(
            "the T1 volume is {:?} voxels but the atlas is {:?}",
            t1.dims, atlas.dims
        )));
    }
    let [nx, ny, nz] = atlas.dims;
    for (name, v) in [("T1", t1), ("atlas", atlas)] {
        if v.data.len() != nx * ny * nz {
            return Err(Error::Config(format!(
                "the {name} volume holds {} values for {:?} voxels",
                v.data.len(),
                v.dims
            )));
        }
    }
    let (dx, dy) = (nx.div_ceil(FACTOR), ny.div_ceil(FACTOR));
    if dx > WIDTH || dy > HEIGHT {
        return Err(Error::Config(format!(
            "a {nx}x{ny} slice downsampled to {dx}x{dy} does not fit {WIDTH}x{HEIGHT}"
        )));
    }
    let (left, top) = ((WIDTH - dx) / 2, (HEIGHT - dy) / 2);
    let k = CLASS_NAMES.len();
    let mut out = PreparedSlices {
        height: HEIGHT,
        width: WIDTH,
        num_classes: k,
        z: Vec::new(),
        images: Vec::new(),
        labels: Vec::new(),
    };
    let plane = nx * ny;
    for z in 0..nz {
        let region = &atlas.data[z * plane..(z + 1) * plane];
        let mut labels = Vec::with_capacity(plane);
        for &v in region {
            let class = (v >= 0.0 && v.fract() == 0.0)
                .then(|| lut.get(v as usize).copied().flatten())
                .flatten()
                .ok_or_else(|| {
                    Error::Config(format!("atlas value {v} at slice {z} has no class"))
                })?;
            labels.push(class);
        }
        if labels.iter().all(|&l| l == 0) {
            continue;
        }
        let image = downsample_mean(&t1.data[z * plane..(z + 1) * plane], nx, ny, FACTOR);
        let labels = downsample_majority(&labels, nx, ny, FACTOR, k);
        let mut image_frame = vec![0u8; HEIGHT * WIDTH];
        let mut label_frame = vec![0u8; HEIGHT * WIDTH];
        for y in 0..dy {
            let row = top + (dy - 1 - y);
            for x in 0..dx {
                let (src, dst) = (y * dx + x, row * WIDTH + left + x);
                image_frame[dst] = image[src].round().clamp(0.0, 255.0) as u8;
                label_frame[dst] = labels[src];
            }
        }
        out.z.push(u16::try_from(z).map_err(|_| {
            Error::Config(format!("slice index {z} does not fit the u16 file field"))
        })?);
        out.images.extend(image_frame);
        out.labels.extend(label_frame);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aal_names_map_to_the_documented_classes() {
        assert_eq!(aal_class("Precentral_L"), Some(1));
        assert_eq!(aal_class("Frontal_Sup_Medial_R"), Some(1));
        assert_eq!(aal_class("Paracentral_Lobule_L"), Some(2));
        assert_eq!(aal_class("Heschl_R"), Some(3));
        assert_eq!(aal_class("Fusiform_L"), Some(4));
        assert_eq!(aal_class("Cingulum_Post_R"), Some(5));
        assert_eq!(aal_class("ParaHippocampal_L"), Some(7));
        assert_eq!(aal_class("Pallidum_R"), Some(11));
        assert_eq!(aal_class("Cerebelum_Crus1_L"), Some(13));
        assert_eq!(aal_class("Vermis_1_2"), Some(14));
        assert_eq!(aal_class("Unknown"), None);
    }

    #[test]
    fn lookup_parses_crlf_lines_and_rejects_unknown_names() {
        let p = Path::new("aal.nii.txt");
        let lut = aal_lookup("1 Precentral_L 2001\r\n2 Vermis_3 9999\r\n\r\n", p).unwrap();
        assert_eq!(
            (lut[0], lut[1], lut[2], lut[3]),
            (Some(0), Some(1), Some(14), None)
        );
        let err = aal_lookup("5 Nowhere 1", p).unwrap_err().to_string();
        assert!(
            err.contains("aal.nii.txt") && err.contains("Nowhere"),
            "{err}"
        );
    }

    #[test]
    fn mean_pads_with_zero_and_majority_breaks_ties_upwards() {
        // 3x2 grid (nx = 3, ny = 2) -> 2x1.
        assert_eq!(
            downsample_mean(&[1., 3., 8., 5., 7., 8.], 3, 2, 2),
            vec![4., 4.]
        );
        // Left block: 0,2,0,2 ties -> 2; right block: 1,1 and two padded zeros -> tie -> 1.
        assert_eq!(
            downsample_majority(&[0, 2, 1, 0, 2, 1], 3, 2, 2, 3),
            vec![2, 1]
        );
        // Three of a kind wins.
        assert_eq!(downsample_majority(&[1, 1, 1, 2], 2, 2, 2, 3), vec![1]);
    }

    #[test]
    fn slices_are_flipped_and_centred() {
        // A 2x2x2 volume: slice 0 unlabelled, slice 1 labelled in its anterior row.
        let vol = |data: Vec<f32>| NiftiVolume {
            dims: [2, 2, 2],
            pixdim: [1.0; 3],
            data,
        };
        let t1 = vol(vec![0., 0., 0., 0., 10., 10., 200., 200.]);
        let atlas = vol(vec![0., 0., 0., 0., 0., 0., 1., 1.]);
        let mut lut = vec![None; 256];
        lut[0] = Some(0);
        lut[1] = Some(9);
        let p = prepare_slices(&t1, &atlas, &lut).unwrap();
        assert_eq!(p.z, vec![1]);
        let centre = (HEIGHT / 2 - 1) * WIDTH + WIDTH / 2 - 1;
        assert_eq!(p.images[centre], 105);
        assert_eq!(p.labels[centre], 9);
        assert_eq!(p.labels.iter().filter(|&&l| l != 0).count(), 1);
    }
}
