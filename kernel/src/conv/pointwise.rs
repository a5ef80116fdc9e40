//! The 1x1 path: a matrix product over the flattened plane, `OC x pixels` accumulators in
//! registers over every input channel of a group (see [`Conv::forward_pointwise`]).

use super::{relu_fn, Conv, Mode, INTERNAL, OC, WB};
use crate::error::Error;
use crate::weights::Tensor;

/// Pixels per register block of the 1x1 path: `OC x PW_PIXELS` accumulators, the pixels'
/// inputs and one weight fit the Cortex-M4F's 32 single-precision registers.
const PW_PIXELS: usize = 4;

impl Conv {
    /// The 1x1 ("pointwise") convolution, a matrix product over the flattened plane:
    /// `out[o][p] = bias[o] + sum_i w[o][i] * in[i][p]` (`cin >= 1`, sizes checked).
    ///
    /// A 1x1 kernel needs no padding, so there is no window: the input planes are read in
    /// place. Per block of [`OC`] output channels, the block's weights are widened once into
    /// a stack buffer laid out `[ic][oc]` (up to [`WB`] input channels at a time; more are
    /// taken in groups, the accumulators going through the output in between). Then the
    /// flattened plane is swept in blocks of [`PW_PIXELS`] (then 4, 2, 1) pixels with
    /// `OC x pixels` accumulators in registers over every input channel of the group: per
    /// input channel, `pixels` input loads and [`OC`] weight loads feed `OC x pixels`
    /// multiply-adds. The sum runs in the same order as on the other paths (bias, then input
    /// channel), so the result is bit-identical to [`Conv::forward_blocked`] and
    /// [`Conv::forward_direct`].
    ///
    /// Without a bias (`None`, the Glow step's invertible 1x1 convolution) the sums start
    /// from 0.
    pub(crate) fn forward_pointwise(
        &self,
        input: &[f32],
        weight: Tensor<'_>,
        bias: Option<Tensor<'_>>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<(), Error> {
        let cin = self.cin;
        let plane = self.height * self.width;
        if self.kernel != 1 || cin == 0 {
            return Err(INTERNAL);
        }
        let mut wbuf = [[0f32; OC]; WB];
        for (ob, out_block) in out.chunks_mut(OC * plane).enumerate() {
            let oc0 = ob * OC;
            let ocn = out_block.len() / plane;
            let mut bbuf = [0f32; OC];
            if let Some(bias) = bias {
                for (j, b) in bbuf.iter_mut().enumerate().take(ocn) {
                    *b = bias
                        .slice(oc0 + j, 1)
                        .and_then(|t| t.iter().next())
                        .ok_or(INTERNAL)?;
                }
            }
            for ic0 in (0..cin).step_by(WB) {
                let g = WB.min(cin - ic0);
                let wk = wbuf.get_mut(..g).ok_or(INTERNAL)?;
                stage_pointwise(wk, weight, oc0, ocn, ic0, cin)?;
                let wk = wbuf.get(..g).ok_or(INTERNAL)?;
                let ins = input.get(ic0 * plane..(ic0 + g) * plane).ok_or(INTERNAL)?;
                let mode = match (ic0 == 0, relu && ic0 + g == cin) {
                    (true, true) => Mode::FirstRelu,
                    (true, false) => Mode::First,
                    (false, true) => Mode::LastRelu,
                    (false, false) => Mode::Middle,
                };
                let pw = Pointwise {
                    ins,
                    wk,
                    plane,
                    bias: &bbuf,
                    mode,
                };
                let mut p = 0;
                while p < plane {
                    let left = plane - p;
                    p += if left >= PW_PIXELS {
                        pw.block::<PW_PIXELS>(p, out_block)?
                    } else if left >= 4 {
                        pw.block::<4>(p, out_block)?
                    } else if left >= 2 {
                        pw.block::<2>(p, out_block)?
                    } else {
                        pw.block::<1>(p, out_block)?
                    };
                }
            }
        }
        Ok(())
    }
}

/// One input-channel group of a 1x1 convolution for one block of [`OC`] output channels.
struct Pointwise<'a> {
    /// The group's input planes, `plane` values each.
    ins: &'a [f32],
    /// The group's staged weights, `[ic][oc]`.
    wk: &'a [[f32; OC]],
    plane: usize,
    /// The block's biases (used by the first group).
    bias: &'a [f32; OC],
    mode: Mode,
}

impl Pointwise<'_> {
    /// Pixels `p .. p + N` of the block's output planes (`out`, `plane` values each), over
    /// the group's input channels. Returns `N`.
    #[inline(always)]
    fn block<const N: usize>(&self, p: usize, out: &mut [f32]) -> Result<usize, Error> {
        let mut acc = [[0f32; N]; OC];
        if matches!(self.mode, Mode::First | Mode::FirstRelu) {
            for (a, &bv) in acc.iter_mut().zip(self.bias) {
                *a = [bv; N];
            }
        } else {
            for (a, op) in acc.iter_mut().zip(out.chunks_exact(self.plane)) {
                *a = *op
                    .get(p..)
                    .and_then(|s| s.first_chunk::<N>())
                    .ok_or(INTERNAL)?;
            }
        }
        // Input channel i's pixels p.. start at i * plane + p: chunks of `plane` from p (the
        // last one is shorter by p, still at least N long).
        let from = self.ins.get(p..).ok_or(INTERNAL)?;
        pointwise_taps::<N>(&mut acc, from, self.plane, self.wk)?;
        for (a, op) in acc.iter().zip(out.chunks_exact_mut(self.plane)) {
            let seg = op
                .get_mut(p..)
                .and_then(|s| s.first_chunk_mut::<N>())
                .ok_or(INTERNAL)?;
            if matches!(self.mode, Mode::LastRelu | Mode::FirstRelu) {
                for (d, &v) in seg.iter_mut().zip(a) {
                    *d = relu_fn(v);
                }
            } else {
                *seg = *a;
            }
        }
        Ok(N)
    }
}

/// `acc[j][i] += wk[ic][j] * x[ic][i]` over the input channels in order, `x[ic]` being the
/// first `N` values of the `ic`-th chunk of `from` (chunks `plane` apart). Not inlined, so
/// the accumulators get the whole register file.
#[inline(never)]
fn pointwise_taps<const N: usize>(
    acc: &mut [[f32; N]; OC],
    from: &[f32],
    plane: usize,
    wk: &[[f32; OC]],
) -> Result<(), Error> {
    #[inline(always)]
    fn tap<const N: usize>(a: &mut [[f32; N]; OC], xs: &[f32; N], wv: &[f32; OC]) {
        for (a, &wj) in a.iter_mut().zip(wv) {
            for (a, &x) in a.iter_mut().zip(xs) {
                *a += wj * x;
            }
        }
    }
    let mut a = *acc;
    // Whole `plane`-long chunks (every channel but the last when p > 0): their length is
    // loop-invariant, so the per-channel length check leaves the loop.
    let mut chunks = from.chunks_exact(plane);
    let mut used = 0;
    for (xs, wv) in (&mut chunks).zip(wk) {
        tap(&mut a, xs.first_chunk::<N>().ok_or(INTERNAL)?, wv);
        used += 1;
    }
    // The last channel's shorter chunk (`plane - p` values), if any.
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let wv = wk.get(used).ok_or(INTERNAL)?;
        tap(&mut a, rest.first_chunk::<N>().ok_or(INTERNAL)?, wv);
    }
    *acc = a;
    Ok(())
}

/// Widens the 1x1 weights `w[oc0 + j][ic0 + i]` (`j < ocn`, `i < wk.len()`) into
/// `wk[i][j]`, zeros for the lanes `j >= ocn` of a partial block. Row `oc0 + j` of the
/// weight matrix is contiguous in the blob, so each is one slice.
fn stage_pointwise(
    wk: &mut [[f32; OC]],
    weight: Tensor<'_>,
    oc0: usize,
    ocn: usize,
    ic0: usize,
    cin: usize,
) -> Result<(), Error> {
    for j in 0..OC {
        if j < ocn {
            let row = weight
                .slice((oc0 + j) * cin + ic0, wk.len())
                .ok_or(INTERNAL)?;
            for (slot, v) in wk.iter_mut().zip(row.iter()) {
                if let Some(s) = slot.get_mut(j) {
                    *s = v;
                }
            }
        } else {
            for slot in wk.iter_mut() {
                if let Some(s) = slot.get_mut(j) {
                    *s = 0.0;
                }
            }
        }
    }
    Ok(())
}
