//! Workloads: the deterministic request plan of each scenario. Request number `i` of a
//! run always maps to the same endpoint, user id and request id for a given `--seed`,
//! whichever connection ends up sending it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cli::ScenarioKind;

/// Largest `--users` for hot-users (the Zipf table holds one `f64` per user).
pub const MAX_ZIPF_USERS: u64 = 10_000_000;

/// One request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /healthz`.
    Health,
    /// `GET /v1/batches/{id}`.
    GetBatch,
    /// `POST /v1/batches/{id}/claims`.
    Claim(Claim),
    /// `GET /v1/products/p<k>/batches?category=..&merchant=..` ([`product_path`]).
    Product(u64),
    /// `POST /v1/checkout/quote` with the run's cart and user.
    Quote,
    /// One checkout (the driver sends its steps in turn): this claim, then wallet reads
    /// of its user, a lock of the coupon for `order_id`, and its redeem.
    Checkout(Checkout),
}

/// The identity of one checkout: a fresh user claims once and orders once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub claim: Claim,
    pub order_id: String,
}

/// The identity of one claim attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claim {
    pub user_id: String,
    pub request_id: String,
}

/// Which requests a plan produces.
#[derive(Debug, Clone)]
enum Workload {
    FlashSale,
    HotUsers {
        zipf: Zipf,
        bot_fraction: f64,
        bots: u64,
    },
    Retries {
        copies: u64,
    },
    Mixed {
        read_fraction: f64,
    },
    Trivial,
    /// Fills a batch up: every request is a fresh drain user (sold-out set-up phase).
    Drain,
    /// Product pages of random products of the campaign catalog.
    ProductLookup,
    /// The same quote again and again.
    Quote,
    /// A fresh user per checkout.
    Checkout,
}

/// Parameters of a plan, taken from the command line.
#[derive(Debug, Clone)]
pub struct PlanParams {
    pub seed: u64,
    pub users: u64,
    pub bot_fraction: f64,
    pub bots: u64,
    pub zipf_exponent: f64,
    pub copies: u64,
    pub read_fraction: f64,
}

/// The request plan of one phase of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    seed: u64,
    users: u64,
    perm: Permutation,
    workload: Workload,
}

impl Plan {
    /// The measured-phase plan of a scenario.
    pub fn for_scenario(kind: ScenarioKind, p: &PlanParams) -> Self {
        let workload = match kind {
            // sold-out measures fresh users claiming from an empty batch: the same shape
            // as a flash sale.
            ScenarioKind::FlashSale | ScenarioKind::SoldOut => Workload::FlashSale,
            ScenarioKind::HotUsers => Workload::HotUsers {
                zipf: Zipf::new(p.users, p.zipf_exponent),
                bot_fraction: p.bot_fraction,
                bots: p.bots.max(1),
            },
            ScenarioKind::Retries => Workload::Retries {
                copies: p.copies.max(1),
            },
            ScenarioKind::Mixed => Workload::Mixed {
                read_fraction: p.read_fraction,
            },
            ScenarioKind::Trivial => Workload::Trivial,
            ScenarioKind::ProductLookup => Workload::ProductLookup,
            ScenarioKind::Quote => Workload::Quote,
            ScenarioKind::Checkout => Workload::Checkout,
        };
        Self::new(p.seed, p.users, workload)
    }

    /// The plan that drains a batch before the sold-out scenario measures.
    pub fn drain(seed: u64) -> Self {
        Self::new(seed, 1, Workload::Drain)
    }

    fn new(seed: u64, users: u64, workload: Workload) -> Self {
        let users = users.max(1);
        Self {
            seed,
            users,
            perm: Permutation::new(users, seed),
            workload,
        }
    }

    /// Request number `i` of this plan.
    pub fn request(&self, i: u64) -> Request {
        let seed = self.seed;
        match &self.workload {
            Workload::Trivial => Request::Health,
            Workload::ProductLookup => {
                Request::Product(request_rng(seed, i).random_range(0..CAMPAIGN_PRODUCTS))
            }
            Workload::Quote => Request::Quote,
            Workload::Checkout => Request::Checkout(Checkout {
                claim: Claim {
                    user_id: format!("ck{seed}-{i}"),
                    request_id: format!("r{seed}-{i}"),
                },
                order_id: format!("o{seed}-{i}"),
            }),
            Workload::FlashSale => Request::Claim(Claim {
                user_id: user_id(seed, self.perm.apply(i % self.users)),
                request_id: format!("r{seed}-{i}"),
            }),
            Workload::Retries { copies } => {
                let k = i / copies;
                Request::Claim(Claim {
                    user_id: user_id(seed, self.perm.apply(k % self.users)),
                    request_id: format!("r{seed}-{k}"),
                })
            }
            Workload::HotUsers {
                zipf,
                bot_fraction,
                bots,
            } => {
                let mut rng = request_rng(seed, i);
                let user = if rng.random::<f64>() < *bot_fraction {
                    format!("bot{seed}-{}", rng.random_range(0..*bots))
                } else {
                    user_id(seed, zipf.sample(rng.random::<f64>()))
                };
                Request::Claim(Claim {
                    user_id: user,
                    request_id: format!("r{seed}-{i}"),
                })
            }
            Workload::Mixed { read_fraction } => {
                let mut rng = request_rng(seed, i);
                if rng.random::<f64>() < *read_fraction {
                    Request::GetBatch
                } else {
                    Request::Claim(Claim {
                        user_id: user_id(seed, rng.random_range(0..self.users)),
                        request_id: format!("r{seed}-{i}"),
                    })
                }
            }
            Workload::Drain => Request::Claim(Claim {
                user_id: format!("drain{seed}-{i}"),
                request_id: format!("rd{seed}-{i}"),
            }),
        }
    }
}

/// Products of the product-lookup catalog (`p0` ..).
pub const CAMPAIGN_PRODUCTS: u64 = 1_000;

/// The product page of product `k`: its category is `c<k % 20>`, its merchant `m<k % 10>`.
pub fn product_path(k: u64) -> String {
    format!(
        "/v1/products/p{k}/batches?category=c{}&merchant=m{}",
        k % 20,
        k % 10
    )
}

/// The id of regular user number `idx`.
pub fn user_id(seed: u64, idx: u64) -> String {
    format!("u{seed}-{idx}")
}

/// The default batch id of a run with this seed.
pub fn default_batch_id(seed: u64) -> String {
    format!("lt-{seed}")
}

/// A random-number generator owned by request `i` alone (independent of scheduling).
fn request_rng(seed: u64, i: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed.rotate_left(32) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A seeded bijection of `0..n` (affine map `a*x + b mod n` with `gcd(a, n) = 1`), so
/// that consecutive requests hit scattered users while each round covers every user.
#[derive(Debug, Clone, Copy)]
struct Permutation {
    n: u64,
    a: u64,
    b: u64,
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Self {
        if n <= 1 {
            return Self { n: 1, a: 1, b: 0 };
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x005E_ED0F_u64);
        let b = rng.random_range(0..n);
        let mut a = rng.random_range(1..n);
        while gcd(a, n) != 1 {
            a = if a + 1 >= n { 1 } else { a + 1 };
        }
        Self { n, a, b }
    }

    fn apply(&self, x: u64) -> u64 {
        let v =
            (u128::from(self.a) * u128::from(x % self.n) + u128::from(self.b)) % u128::from(self.n);
        // v < n <= u64::MAX, so the conversion cannot fail.
        u64::try_from(v).unwrap_or(0)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Zipf distribution over user indices `0..n`: index `k` has weight `1/(k+1)^s`.
#[derive(Debug, Clone)]
struct Zipf {
    /// Cumulative weights, normalised so the last one is 1.
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64, s: f64) -> Self {
        let n = usize::try_from(n.clamp(1, MAX_ZIPF_USERS)).unwrap_or(1);
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 1..=n {
            total += (k as f64).powf(-s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Self { cdf }
    }

    /// Maps a uniform `u` in `[0, 1)` to an index.
    fn sample(&self, u: f64) -> u64 {
        let idx = self.cdf.partition_point(|&c| c <= u);
        idx.min(self.cdf.len() - 1) as u64
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn params(users: u64) -> PlanParams {
        PlanParams {
            seed: 7,
            users,
            bot_fraction: 0.2,
            bots: 3,
            zipf_exponent: 1.0,
            copies: 4,
            read_fraction: 0.5,
        }
    }

    fn claim(r: Request) -> Claim {
        match r {
            Request::Claim(c) => c,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn campaign_plans_are_deterministic_and_in_range() {
        let p = Plan::for_scenario(ScenarioKind::ProductLookup, &params(10));
        let again = Plan::for_scenario(ScenarioKind::ProductLookup, &params(10));
        let mut seen = HashSet::new();
        for i in 0..5_000 {
            let r = p.request(i);
            assert_eq!(r, again.request(i));
            match r {
                Request::Product(k) => {
                    assert!(k < CAMPAIGN_PRODUCTS);
                    seen.insert(k);
                }
                other => panic!("expected a product page, got {other:?}"),
            }
        }
        assert!(
            seen.len() > 900,
            "pages spread over the catalog: {}",
            seen.len()
        );
        assert_eq!(
            product_path(123),
            "/v1/products/p123/batches?category=c3&merchant=m3"
        );
        let q = Plan::for_scenario(ScenarioKind::Quote, &params(10));
        assert!((0..100).all(|i| q.request(i) == Request::Quote));
    }

    #[test]
    fn checkouts_are_fresh_users_and_orders() {
        let p = Plan::for_scenario(ScenarioKind::Checkout, &params(10));
        let mut users = HashSet::new();
        let mut orders = HashSet::new();
        for i in 0..1_000 {
            let Request::Checkout(c) = p.request(i) else {
                panic!("expected a checkout");
            };
            assert_eq!(Request::Checkout(c.clone()), p.request(i), "deterministic");
            users.insert(c.claim.user_id);
            orders.insert(c.order_id);
        }
        // More checkouts than --users: each still has a user (and an order) of its own.
        assert_eq!((users.len(), orders.len()), (1_000, 1_000));
    }

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1, 2, 3, 10, 97, 1000, 1024] {
            for seed in 0..5 {
                let p = Permutation::new(n, seed);
                let seen: HashSet<u64> = (0..n).map(|x| p.apply(x)).collect();
                assert_eq!(seen.len() as u64, n, "n={n} seed={seed}");
                assert!(seen.iter().all(|&v| v < n));
            }
        }
    }

    #[test]
    fn flash_sale_covers_each_user_once_per_round() {
        let plan = Plan::for_scenario(ScenarioKind::FlashSale, &params(100));
        let users: HashSet<String> = (0..100).map(|i| claim(plan.request(i)).user_id).collect();
        assert_eq!(users.len(), 100);
        let rids: HashSet<String> = (0..300)
            .map(|i| claim(plan.request(i)).request_id)
            .collect();
        assert_eq!(rids.len(), 300, "fresh request id per attempt");
        assert_eq!(
            claim(plan.request(5)).user_id,
            claim(plan.request(105)).user_id
        );
    }

    #[test]
    fn plans_are_deterministic_per_seed() {
        for kind in [
            ScenarioKind::FlashSale,
            ScenarioKind::HotUsers,
            ScenarioKind::Retries,
            ScenarioKind::Mixed,
        ] {
            let a = Plan::for_scenario(kind, &params(1000));
            let b = Plan::for_scenario(kind, &params(1000));
            let mut other = params(1000);
            other.seed = 8;
            let c = Plan::for_scenario(kind, &other);
            let seq_a: Vec<Request> = (0..200).map(|i| a.request(i)).collect();
            let seq_b: Vec<Request> = (0..200).map(|i| b.request(i)).collect();
            let seq_c: Vec<Request> = (0..200).map(|i| c.request(i)).collect();
            assert_eq!(seq_a, seq_b, "{kind}");
            assert_ne!(seq_a, seq_c, "{kind}");
        }
    }

    #[test]
    fn retries_repeat_each_request_id() {
        let plan = Plan::for_scenario(ScenarioKind::Retries, &params(100));
        let mut groups: HashMap<String, HashSet<String>> = HashMap::new();
        let mut counts: HashMap<String, u32> = HashMap::new();
        for i in 0..40 {
            let c = claim(plan.request(i));
            *counts.entry(c.request_id.clone()).or_default() += 1;
            groups.entry(c.request_id).or_default().insert(c.user_id);
        }
        assert_eq!(counts.len(), 10);
        assert!(counts.values().all(|&n| n == 4));
        assert!(
            groups.values().all(|u| u.len() == 1),
            "same user per request id"
        );
    }

    #[test]
    fn hot_users_are_skewed_and_bots_present() {
        let plan = Plan::for_scenario(ScenarioKind::HotUsers, &params(1000));
        let mut per_user: HashMap<String, u32> = HashMap::new();
        let n = 20_000;
        for i in 0..n {
            *per_user.entry(claim(plan.request(i)).user_id).or_default() += 1;
        }
        let bot_requests: u32 = per_user
            .iter()
            .filter(|(u, _)| u.starts_with("bot"))
            .map(|(_, c)| c)
            .sum();
        let bot_share = f64::from(bot_requests) / n as f64;
        assert!((0.17..0.23).contains(&bot_share), "bot share {bot_share}");
        assert!(per_user.keys().filter(|u| u.starts_with("bot")).count() <= 3);
        let top = per_user.get(&user_id(7, 0)).copied().unwrap_or(0);
        let tail = per_user.get(&user_id(7, 999)).copied().unwrap_or(0);
        assert!(top > 20 * tail.max(1), "rank 1 {top} vs rank 1000 {tail}");
    }

    #[test]
    fn mixed_respects_read_fraction() {
        let plan = Plan::for_scenario(ScenarioKind::Mixed, &params(1000));
        let reads = (0..10_000)
            .filter(|&i| plan.request(i) == Request::GetBatch)
            .count();
        assert!((4_500..5_500).contains(&reads), "{reads}");
    }

    #[test]
    fn trivial_and_drain() {
        let plan = Plan::for_scenario(ScenarioKind::Trivial, &params(10));
        assert_eq!(plan.request(3), Request::Health);
        let drain = Plan::drain(7);
        let a = claim(drain.request(0));
        let b = claim(drain.request(1));
        assert_ne!(a.user_id, b.user_id);
        assert!(a.user_id.starts_with("drain7-"));
    }

    #[test]
    fn zipf_sampling_edges() {
        let z = Zipf::new(5, 1.0);
        assert_eq!(z.sample(0.0), 0);
        assert_eq!(z.sample(0.999_999_9), 4);
        assert_eq!(z.sample(1.0), 4);
        let uniform = Zipf::new(4, 0.0);
        assert_eq!(uniform.sample(0.3), 1);
    }

    #[test]
    fn ids_use_the_allowed_alphabet() {
        let ok = |s: &str| {
            (1..=128).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
        };
        let plan = Plan::for_scenario(ScenarioKind::FlashSale, &params(u64::MAX));
        let c = claim(plan.request(u64::MAX));
        assert!(ok(&c.user_id) && ok(&c.request_id), "{c:?}");
        assert!(crate::cli::valid_batch_id(&default_batch_id(u64::MAX)));
    }
}
