//! The model: a seeded MLP, real arithmetic per request. Every worker builds one in memory
//! at start (no file, no download); the root builds its own copies to check the answers.

/// splitmix64: a tiny, good PRNG for weights and inputs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

const INPUT: usize = 16;
pub(crate) const SHAPE: [usize; 4] = [INPUT, 64, 64, 8];

struct Dense {
    n_in: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

/// A 16→64→64→8 perceptron: tanh, ReLU, softmax. Its weights depend on the seed and the
/// version only, so the root can rebuild any worker's model to check its answers.
pub(crate) struct Mlp {
    pub(crate) version: u32,
    layers: Vec<Dense>,
}

impl Mlp {
    pub(crate) fn new(seed: u64, version: u32) -> Self {
        let mut rng = SplitMix64(seed ^ u64::from(version).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let layers = SHAPE
            .windows(2)
            .map(|io| {
                let scale = 1.0 / (io[0] as f32).sqrt();
                Dense {
                    n_in: io[0],
                    w: (0..io[0] * io[1]).map(|_| rng.unit() * scale).collect(),
                    b: (0..io[1]).map(|_| rng.unit() * 0.1).collect(),
                }
            })
            .collect();
        Self { version, layers }
    }

    pub(crate) fn n_weights(&self) -> usize {
        self.layers.iter().map(|l| l.w.len() + l.b.len()).sum()
    }

    /// The most likely class and its probability.
    pub(crate) fn infer(&self, input: &[f32]) -> (u32, f32) {
        let mut x = input.to_vec();
        for (i, layer) in self.layers.iter().enumerate() {
            let mut y = layer.b.clone();
            for (o, yo) in y.iter_mut().enumerate() {
                let row = &layer.w[o * layer.n_in..(o + 1) * layer.n_in];
                *yo += row.iter().zip(&x).map(|(w, v)| w * v).sum::<f32>();
            }
            match i {
                0 => y.iter_mut().for_each(|v| *v = v.tanh()),
                1 => y.iter_mut().for_each(|v| *v = v.max(0.0)),
                _ => {}
            }
            x = y;
        }
        let max = x.iter().copied().fold(f32::MIN, f32::max);
        let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
        let (class, best) =
            x.iter().enumerate().fold(
                (0, f32::MIN),
                |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
            );
        (u32::try_from(class).unwrap_or(0), (best - max).exp() / sum)
    }
}

/// The input of request `req` (the root makes it; any process could remake it).
pub(crate) fn input_for(seed: u64, req: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed.rotate_left(17) ^ req.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (0..INPUT).map(|_| rng.unit()).collect()
}
