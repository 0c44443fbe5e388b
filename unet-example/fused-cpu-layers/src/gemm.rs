//! A bounds-checked f32 matrix product on slices, over the `gemm` crate that candle's
//! CPU matmul runs on, for the fused CPU ops that need products inside one op.

use gemm::Parallelism;

/// A row-major or strided view of a matrix inside a slice: element `(i, j)` is
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A contiguous row-major `[rows, cols]` matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) -> candle::Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        if last >= self.data.len() {
            candle::bail!(
                "matmul: {what} of {rows}x{cols} does not fit {} values",
                self.data.len()
            )
        }
        Ok(())
    }
}

/// How many threads a product of this many multiply-adds should use: one below ~1 M,
/// where splitting costs more than it saves, else rayon's pool.
pub(crate) fn threads_for(flops: usize) -> usize {
    if flops < 1 << 20 {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// `dst = lhs × rhs` (or `dst += lhs × rhs` with `accumulate`), `dst` row-major `[m, n]`,
/// `lhs` `[m, k]`, `rhs` `[k, n]`, on `threads` threads.
pub(crate) fn matmul(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: View,
    rhs: View,
    accumulate: bool,
    threads: usize,
) -> candle::Result<()> {
    if dst.len() != m * n {
        candle::bail!(
            "matmul: destination holds {} values, not {m}x{n}",
            dst.len()
        )
    }
    lhs.check(m, k, "left operand")?;
    rhs.check(k, n, "right operand")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the checks above keep every index the product touches inside its slice
    // (`dst` is m×n row-major; `lhs` / `rhs` reach at most their checked last index),
    // and `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_match_a_naive_loop_with_transposes_and_accumulation() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        let want = naive(&a, &b, m, n, k);
        let mut c = vec![0f32; m * n];
        matmul(
            &mut c,
            (m, n, k),
            View::rows(&a, k),
            View::rows(&b, n),
            false,
            1,
        )
        .unwrap();
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // aᵀ stored as [k, m], read back transposed; accumulate doubles the result.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let at_t = View {
            data: &at,
            rs: 1,
            cs: m,
        };
        matmul(&mut c, (m, n, k), at_t, View::rows(&b, n), true, 2).unwrap();
        for (x, y) in c.iter().zip(&want) {
            assert!((x - 2.0 * y).abs() < 1e-5);
        }
    }

    #[test]
    fn operands_too_small_are_an_error() {
        let mut c = vec![0f32; 4];
        let a = vec![0f32; 3];
        let err = matmul(
            &mut c,
            (2, 2, 2),
            View::rows(&a, 2),
            View::rows(&a, 2),
            false,
            1,
        );
        assert!(err.unwrap_err().to_string().contains("left operand"));
    }
}
