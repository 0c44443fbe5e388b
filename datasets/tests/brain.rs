//! The embedded brain slices: split sizes, disjoint contiguous slabs, every class in
//! every split.

use std::collections::HashSet;

use datasets::brain::{split_of_slice, CLASS_NAMES, SLAB};
use datasets::{class_counts, BrainSlices, Dataset, Split};

#[test]
fn splits_have_the_documented_sizes_and_are_disjoint() {
    let mut seen = HashSet::new();
    let mut sizes = Vec::new();
    for split in Split::ALL {
        let ds = BrainSlices::load(split).unwrap();
        sizes.push(ds.len());
        for z in ds.z_indices() {
            assert!(seen.insert(z), "slice z = {z} is in two splits");
        }
    }
    assert_eq!(sizes, vec![86, 30, 30]);
    assert_eq!(seen.len(), 146);
    assert_eq!(
        (seen.iter().min(), seen.iter().max()),
        (Some(&10), Some(&155))
    );
}

#[test]
fn splits_are_contiguous_slabs() {
    // Consecutive labelled slices change split only at slab boundaries.
    let changes: Vec<usize> = (1..146)
        .filter(|&i| split_of_slice(i) != split_of_slice(i - 1))
        .collect();
    assert!(
        changes.windows(2).all(|w| w[1] - w[0] >= SLAB),
        "{changes:?}"
    );
    for split in Split::ALL {
        let z = BrainSlices::load(split).unwrap().z_indices();
        assert!(z.windows(2).all(|w| w[0] < w[1]));
    }
}

#[test]
fn every_class_is_in_every_split() {
    for split in Split::ALL {
        let ds = BrainSlices::load(split).unwrap();
        assert_eq!(ds.num_classes(), CLASS_NAMES.len());
        let counts = class_counts(&ds).unwrap();
        for (class, &count) in counts.iter().enumerate() {
            assert!(
                count > 0,
                "class {} missing from {split}",
                CLASS_NAMES[class]
            );
        }
        let total: u64 = counts.iter().sum();
        assert_eq!(total as usize, ds.len() * 112 * 96, "no void pixel");
        let background = counts[0] as f64 / total as f64;
        assert!(
            (0.7..0.8).contains(&background),
            "{split}: background {background}"
        );
    }
}

#[test]
fn samples_are_grey_images_in_unit_range() {
    let ds = BrainSlices::load(Split::Val).unwrap();
    let s = ds.get(10).unwrap();
    assert_eq!((s.channels, s.height, s.width), (1, 112, 96));
    assert!(s.image.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(s.image.iter().any(|&v| v > 0.5));
    assert_eq!(s, ds.get(10).unwrap());
    assert!(ds.get(30).is_err());
    assert_eq!(ds.palette().len(), 15);
}
