//! Property tests: on random small inputs the losses equal the Lovász extension computed
//! independently from its definition, the gradients match finite differences, and the
//! value does not depend on the order of tied errors.

use candle::{DType, Device, Tensor, Var};
use lovasz_candle::{
    lovasz_hinge, lovasz_sigmoid, lovasz_softmax, Classes, LovaszHingeConfig, LovaszSigmoidConfig,
    LovaszSoftmaxConfig,
};
use proptest::prelude::*;

const VOID: u32 = 255;

/// The Lovász extension of the Jaccard loss of one class, from its definition as an
/// integral over thresholds: `∫_0^∞ Δ({i : e_i ≥ t}) dt` for non-negative errors, where
/// `Δ(M) = 1 - |F \ M| / |F ∪ M|` is evaluated on each level set as an explicit set.
fn lovasz_extension(errors: &[f64], fg: &[bool]) -> f64 {
    let n = errors.len();
    if n == 0 {
        return 0.0;
    }
    let delta = |set: &[bool]| -> f64 {
        let mut inter = 0usize;
        let mut union = 0usize;
        for i in 0..n {
            if fg[i] && !set[i] {
                inter += 1;
            }
            if fg[i] || set[i] {
                union += 1;
            }
        }
        if union == 0 {
            0.0
        } else {
            1.0 - inter as f64 / union as f64
        }
    };
    let mut levels: Vec<f64> = errors.iter().copied().filter(|&e| e > 0.0).collect();
    levels.sort_by(|a, b| b.partial_cmp(a).unwrap());
    levels.dedup();
    let mut total = 0.0;
    for (k, &t) in levels.iter().enumerate() {
        let next = levels.get(k + 1).copied().unwrap_or(0.0);
        let set: Vec<bool> = errors.iter().map(|&e| e >= t).collect();
        total += (t - next) * delta(&set);
    }
    total
}

/// A random small problem: `probas [B, C, S]` (values in (0, 1), not normalised) and
/// `labels [B, S]` with void pixels.
#[derive(Debug, Clone)]
struct Problem {
    b: usize,
    c: usize,
    s: usize,
    probas: Vec<f64>,
    labels: Vec<u32>,
}

fn problem(max_classes: usize) -> impl Strategy<Value = Problem> {
    (1usize..=2, 1usize..=max_classes, 1usize..=4).prop_flat_map(|(b, c, s)| {
        let probas = prop::collection::vec(0.001f64..0.999, b * c * s);
        let labels = prop::collection::vec(prop_oneof![4 => 0..c as u32, 1 => Just(VOID)], b * s);
        (probas, labels).prop_map(move |(probas, labels)| Problem {
            b,
            c,
            s,
            probas,
            labels,
        })
    })
}

impl Problem {
    fn groups(&self, per_image: bool) -> Vec<Vec<usize>> {
        if per_image {
            (0..self.b).map(|b| vec![b]).collect()
        } else {
            vec![(0..self.b).collect()]
        }
    }

    /// Valid pixels of a group as (image, pixel) pairs.
    fn valid(&self, images: &[usize]) -> Vec<(usize, usize)> {
        images
            .iter()
            .flat_map(|&b| (0..self.s).map(move |i| (b, i)))
            .filter(|&(b, i)| self.labels[b * self.s + i] != VOID)
            .collect()
    }

    fn brute_softmax(&self, classes: &Classes, per_image: bool) -> f64 {
        let groups = self.groups(per_image);
        let mut total = 0.0;
        for images in &groups {
            let pixels = self.valid(images);
            let list: Vec<usize> = match classes {
                Classes::List(l) => l.clone(),
                _ => (0..self.c).collect(),
            };
            let mut losses = Vec::new();
            for c in list {
                let fg: Vec<bool> = pixels
                    .iter()
                    .map(|&(b, i)| self.labels[b * self.s + i] == c as u32)
                    .collect();
                if *classes == Classes::Present && !fg.contains(&true) {
                    continue;
                }
                let errors: Vec<f64> = pixels
                    .iter()
                    .zip(&fg)
                    .map(|(&(b, i), &f)| {
                        ((f as u8 as f64) - self.probas[(b * self.c + c) * self.s + i]).abs()
                    })
                    .collect();
                losses.push(lovasz_extension(&errors, &fg));
            }
            if !losses.is_empty() && !pixels.is_empty() {
                total += losses.iter().sum::<f64>() / losses.len() as f64;
            }
        }
        total / groups.len() as f64
    }

    /// Binary losses on channel 0: hinge on logits `2p - 1`, or sigmoid on `p`.
    fn brute_binary(&self, hinge: bool, per_image: bool) -> f64 {
        let groups = self.groups(per_image);
        let mut total = 0.0;
        for images in &groups {
            let pixels = self.valid(images);
            let fg: Vec<bool> = pixels
                .iter()
                .map(|&(b, i)| self.labels[b * self.s + i] == 1)
                .collect();
            let errors: Vec<f64> = pixels
                .iter()
                .zip(&fg)
                .map(|(&(b, i), &f)| {
                    let p = self.probas[b * self.c * self.s + i];
                    if hinge {
                        let x = 2.0 * p - 1.0;
                        (1.0 - x * if f { 1.0 } else { -1.0 }).max(0.0)
                    } else {
                        ((f as u8 as f64) - p).abs()
                    }
                })
                .collect();
            total += lovasz_extension(&errors, &fg);
        }
        total / groups.len() as f64
    }

    fn probas_tensor(&self) -> Tensor {
        Tensor::from_vec(self.probas.clone(), (self.b, self.c, self.s), &Device::Cpu).unwrap()
    }

    fn labels_tensor(&self) -> Tensor {
        Tensor::from_vec(self.labels.clone(), (self.b, self.s), &Device::Cpu).unwrap()
    }

    /// Binary view: channel 0 as `[B, S]`, labels mapped to 0 / 1 (void kept).
    fn binary(&self) -> (Tensor, Tensor) {
        let p = self
            .probas_tensor()
            .narrow(1, 0, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let l: Vec<u32> = self
            .labels
            .iter()
            .map(|&l| if l == VOID { VOID } else { l % 2 })
            .collect();
        (
            p,
            Tensor::from_vec(l, (self.b, self.s), &Device::Cpu).unwrap(),
        )
    }

    fn with_binary_labels(&self) -> Problem {
        let mut p = self.clone();
        p.labels = self
            .labels
            .iter()
            .map(|&l| if l == VOID { VOID } else { l % 2 })
            .collect();
        p
    }

    /// True when no two errors of any class are within `gap` (finite differences stay on
    /// one linear piece).
    fn tie_free(&self, gap: f64) -> bool {
        let mut values = self.probas.clone();
        values.extend(self.probas.iter().map(|p| 1.0 - p));
        values.sort_by(|a, b| a.partial_cmp(b).unwrap());
        values.windows(2).all(|w| w[1] - w[0] > gap)
    }
}

fn classes_strategy(c: usize) -> impl Strategy<Value = Classes> {
    prop_oneof![
        Just(Classes::All),
        Just(Classes::Present),
        prop::collection::vec(0..c, 0..=3).prop_map(Classes::List),
    ]
}

fn softmax_case() -> impl Strategy<Value = (Problem, Classes, bool)> {
    problem(4).prop_flat_map(|p| {
        let c = p.c;
        (Just(p), classes_strategy(c), any::<bool>())
    })
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn softmax_loss(x: &Tensor, labels: &Tensor, classes: &Classes, per_image: bool) -> Tensor {
    let cfg = LovaszSoftmaxConfig {
        classes: classes.clone(),
        per_image,
        ignore_index: Some(VOID),
        ..Default::default()
    };
    lovasz_softmax(x, labels, &cfg).unwrap()
}

/// Central finite differences of `f` at `x`, one coordinate at a time.
fn finite_differences(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    (0..x.len())
        .map(|i| {
            let mut plus = x.to_vec();
            let mut minus = x.to_vec();
            plus[i] += h;
            minus[i] -= h;
            (f(&plus) - f(&minus)) / (2.0 * h)
        })
        .collect()
}

fn gradient(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Vec<f64> {
    let var = Var::from_tensor(x).unwrap();
    let loss = f(var.as_tensor());
    let grads = loss.backward().unwrap();
    match grads.get(&var) {
        Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
        None => vec![0.0; x.elem_count()],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn softmax_equals_definition((p, classes, per_image) in softmax_case()) {
        for dtype in [DType::F64, DType::F32] {
            let x = p.probas_tensor().to_dtype(dtype).unwrap();
            let got = scalar(&softmax_loss(&x, &p.labels_tensor(), &classes, per_image));
            let want = p.brute_softmax(&classes, per_image);
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            prop_assert!((got - want).abs() <= tol, "{dtype:?}: got {got}, definition {want}");
        }
    }

    #[test]
    fn hinge_and_sigmoid_equal_definition(p in problem(2), per_image in any::<bool>()) {
        let bp = p.with_binary_labels();
        let (probas, labels) = p.binary();
        let logits = probas.affine(2.0, -1.0).unwrap();
        let hinge = scalar(&lovasz_hinge(&logits, &labels, &LovaszHingeConfig { per_image, ignore_index: Some(VOID), ..Default::default() }).unwrap());
        let want = bp.brute_binary(true, per_image);
        prop_assert!((hinge - want).abs() <= 1e-12, "hinge {hinge} vs definition {want}");
        let sigmoid = scalar(&lovasz_sigmoid(&probas, &labels, &LovaszSigmoidConfig { per_image, ignore_index: Some(VOID), ..Default::default() }).unwrap());
        let want = bp.brute_binary(false, per_image);
        prop_assert!((sigmoid - want).abs() <= 1e-12, "sigmoid {sigmoid} vs definition {want}");
    }

    #[test]
    fn softmax_gradient_matches_finite_differences((p, classes, per_image) in softmax_case()) {
        prop_assume!(p.tie_free(1e-4));
        let labels = p.labels_tensor();
        let shape = (p.b, p.c, p.s);
        let grad = gradient(&p.probas_tensor(), |x| softmax_loss(x, &labels, &classes, per_image));
        let fd = finite_differences(&p.probas, |v| {
            let x = Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap();
            scalar(&softmax_loss(&x, &labels, &classes, per_image))
        });
        for (g, f) in grad.iter().zip(&fd) {
            prop_assert!((g - f).abs() < 1e-6, "gradient {grad:?} vs finite differences {fd:?}");
        }
    }

    #[test]
    fn hinge_gradient_matches_finite_differences(p in problem(2), per_image in any::<bool>()) {
        let (probas, labels) = p.binary();
        let logits: Vec<f64> = probas.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().map(|v| 2.0 * v - 1.0).collect();
        // Stay away from ties and from the hinge's kink at error 0 (logit ±1).
        let mut errs: Vec<f64> = logits.iter().flat_map(|x| [1.0 - x, 1.0 + x]).collect();
        errs.push(0.0);
        errs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        prop_assume!(errs.windows(2).all(|w| w[1] - w[0] > 1e-4));
        let cfg = LovaszHingeConfig { per_image, ignore_index: Some(VOID), ..Default::default() };
        let shape = (p.b, p.s);
        let x = Tensor::from_vec(logits.clone(), shape, &Device::Cpu).unwrap();
        let grad = gradient(&x, |x| lovasz_hinge(x, &labels, &cfg).unwrap());
        let fd = finite_differences(&logits, |v| {
            let x = Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap();
            scalar(&lovasz_hinge(&x, &labels, &cfg).unwrap())
        });
        for (g, f) in grad.iter().zip(&fd) {
            prop_assert!((g - f).abs() < 1e-6, "gradient {grad:?} vs finite differences {fd:?}");
        }
    }

    /// Quantised probabilities make many tied errors; reversing the pixel order inside each
    /// image reverses the order ties are broken in, and must not change the value.
    #[test]
    fn value_does_not_depend_on_tie_order((mut p, classes, per_image) in softmax_case()) {
        for v in p.probas.iter_mut() {
            *v = (*v * 4.0).floor() / 4.0;
        }
        let mut q = p.clone();
        for b in 0..p.b {
            for i in 0..p.s {
                let j = p.s - 1 - i;
                q.labels[b * p.s + i] = p.labels[b * p.s + j];
                for c in 0..p.c {
                    q.probas[(b * p.c + c) * p.s + i] = p.probas[(b * p.c + c) * p.s + j];
                }
            }
        }
        let a = scalar(&softmax_loss(&p.probas_tensor(), &p.labels_tensor(), &classes, per_image));
        let b = scalar(&softmax_loss(&q.probas_tensor(), &q.labels_tensor(), &classes, per_image));
        prop_assert!((a - b).abs() <= 1e-12, "{a} vs {b} after reordering ties");
        prop_assert!((a - p.brute_softmax(&classes, per_image)).abs() <= 1e-12);
    }
}
