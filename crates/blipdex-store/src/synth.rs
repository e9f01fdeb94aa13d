//! Seeded synthetic BLIP-2-like data for tests and `blipdex bench search`.

use crate::{content_hash_bytes, ImageRecord, PhotoMeta};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Clustered unit embeddings. Every image belongs to one of `centres`: its own direction is
/// img = normalize(centre + image_noise * g) with g ~ N(0, I/E) (so |g| ~ 1), and each of its Q
/// query vectors is normalize(img + query_noise * g'), except that `aspects` of them start from
/// a second, random centre (an image showing two things). A text query is
/// normalize(centre + text_noise * g).
///
/// image_noise = 0, query_noise = 1 is the adversarial case for one-vector-per-image indexes:
/// all within-cluster variation is per query vector, so an image's best vector for a text is
/// unrelated to its mean.
#[derive(Debug, Clone)]
pub struct Synth {
    pub q: usize,
    pub e: usize,
    pub centres: Vec<f32>,
    pub image_noise: f32,
    pub query_noise: f32,
    pub text_noise: f32,
    pub aspects: usize,
    pub seed: u64,
}

pub fn gauss(rng: &mut StdRng) -> f32 {
    // Box-Muller; rand_distr is not worth a dependency here.
    let u1: f32 = rng.random::<f32>().max(1e-12);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    for x in v {
        *x /= n;
    }
}

impl Synth {
    pub fn new(q: usize, e: usize, n_centres: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut centres = Vec::with_capacity(n_centres * e);
        for _ in 0..n_centres {
            let mut c: Vec<f32> = (0..e).map(|_| gauss(&mut rng)).collect();
            normalize(&mut c);
            centres.extend(c);
        }
        Self {
            q,
            e,
            centres,
            image_noise: 1.0,
            query_noise: 0.5,
            text_noise: 1.0,
            aspects: 0,
            seed,
        }
    }

    pub fn n_centres(&self) -> usize {
        self.centres.len() / self.e
    }

    fn noisy(&self, base: &[f32], noise: f32, rng: &mut StdRng) -> Vec<f32> {
        let s = noise / (self.e as f32).sqrt();
        let mut v: Vec<f32> = base.iter().map(|x| x + s * gauss(rng)).collect();
        normalize(&mut v);
        v
    }

    fn centre(&self, c: usize) -> &[f32] {
        &self.centres[c * self.e..(c + 1) * self.e]
    }

    /// Q*E embeddings of image `i` (deterministic in (seed, i)).
    pub fn image(&self, i: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ 0x9e37_79b9_7f4a_7c15 ^ i.wrapping_mul(0x1000_0000_01b3),
        );
        let main = rng.random_range(0..self.n_centres());
        let second = rng.random_range(0..self.n_centres());
        let main = self.noisy(self.centre(main), self.image_noise, &mut rng);
        let second = self.noisy(self.centre(second), self.image_noise, &mut rng);
        let mut out = Vec::with_capacity(self.q * self.e);
        for j in 0..self.q {
            let base = if j < self.aspects { &second } else { &main };
            out.extend(self.noisy(base, self.query_noise, &mut rng));
        }
        out
    }

    /// Text embedding number `i`.
    pub fn text(&self, i: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(!self.seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let c = rng.random_range(0..self.n_centres());
        self.noisy(self.centre(c), self.text_noise, &mut rng)
    }

    /// EXIF metadata for image `i`, spread so that filters of known selectivity exist: one
    /// of 100 camera models (`Model-007` keeps 1%), a date among 3650 days from 2010-01-01
    /// (any 36.5 days keep 1%), a location for every second image.
    pub fn photo(&self, i: u64) -> PhotoMeta {
        let mut rng = StdRng::seed_from_u64(self.seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let day = rng.random_range(0..3650i64);
        let located = i.is_multiple_of(2);
        PhotoMeta {
            taken_at: Some(1_262_304_000 + day * 86_400 + rng.random_range(0..86_400)),
            taken_offset_min: None,
            camera_make: Some("Synth".into()),
            camera_model: Some(format!("Model-{:03}", rng.random_range(0..100))),
            gps_lat: located.then(|| rng.random_range(-60.0..70.0)),
            gps_lon: located.then(|| rng.random_range(-180.0..180.0)),
        }
    }

    pub fn record(&self, i: u64) -> ImageRecord {
        let path = format!("/photos/{:03}/img_{i:07}.jpg", i % 997);
        ImageRecord {
            path: path.clone(),
            paths: vec![path],
            content_hash: content_hash_bytes(&i.to_le_bytes()),
            width: 640 + (i % 7) as u32,
            height: 480 + (i % 5) as u32,
            file_size: 100_000 + i,
            mtime_ns: 1_700_000_000_000_000_000 + i as i64,
            embeds: self.image(i),
            caption: None,
            meta: None,
        }
    }
}

/// recall@k of `got` against `truth` (image ids).
pub fn recall(truth: &[u64], got: &[u64]) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    truth.iter().filter(|t| got.contains(t)).count() as f64 / truth.len() as f64
}
