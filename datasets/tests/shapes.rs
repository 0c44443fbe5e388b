//! The synthetic shapes generator: determinism by seed, class coverage, void borders.

use datasets::{class_counts, Dataset, ShapesConfig, ShapesDataset, VOID};

#[test]
fn same_seed_same_samples_other_seed_other_samples() {
    let cfg = ShapesConfig {
        len: 8,
        seed: 3,
        ..Default::default()
    };
    let a = ShapesDataset::new(cfg.clone());
    let b = ShapesDataset::new(cfg.clone());
    let c = ShapesDataset::new(ShapesConfig { seed: 4, ..cfg });
    for i in 0..8 {
        assert_eq!(a.get(i).unwrap(), b.get(i).unwrap());
        assert_ne!(a.get(i).unwrap(), c.get(i).unwrap());
    }
    assert_ne!(a.get(0).unwrap(), a.get(1).unwrap());
}

#[test]
fn all_classes_appear_with_thin_and_rare_ones_smaller() {
    let ds = ShapesDataset::new(ShapesConfig {
        num_classes: 9,
        len: 64,
        ..Default::default()
    });
    let counts = class_counts(&ds).unwrap();
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    // Class 1 is an ellipse, 3 a thin line, 4 a rare speck.
    assert!(counts[3] < counts[1] && counts[4] < counts[1], "{counts:?}");
    assert!(counts[0] > counts.iter().skip(1).sum::<u64>(), "{counts:?}");
    let void: usize = (0..64)
        .map(|i| {
            ds.get(i)
                .unwrap()
                .mask
                .iter()
                .filter(|&&m| m == VOID)
                .count()
        })
        .sum();
    assert!(void > 0);
}

#[test]
fn sizes_channels_and_no_void_option() {
    let ds = ShapesDataset::new(ShapesConfig {
        height: 24,
        width: 40,
        channels: 1,
        void_border: 0.0,
        len: 4,
        ..Default::default()
    });
    for i in 0..4 {
        let s = ds.get(i).unwrap();
        assert_eq!(
            (s.channels, s.height, s.width, s.image.len()),
            (1, 24, 40, 960)
        );
        assert!(s.mask.iter().all(|&m| m < 6));
        assert!(s.image.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    assert!(ds.get(4).is_err());
    assert_eq!(ds.class_names().len(), 6);
}

#[test]
fn invalid_config_is_an_error_not_a_panic() {
    let cfg = ShapesConfig {
        num_classes: 1,
        ..Default::default()
    };
    assert!(ShapesDataset::try_new(cfg.clone()).is_err());
    let err = ShapesDataset::new(cfg).get(0).unwrap_err().to_string();
    assert!(err.contains("num_classes"), "{err}");
}
