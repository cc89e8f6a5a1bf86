//! The checkout quote: which of a user's coupons apply to a cart, the discount each gives,
//! why the others do not, and the best combination, apportioned over the cart's lines.
//! Pure: no I/O and no clock (the caller passes `now`), so every rule below is a function
//! of the cart, the coupons and their batches' terms.
//!
//! Invariants kept here: money is integer minor units and every sum and product is checked
//! (a cart whose total does not fit an `i64` is refused); a discount never exceeds the
//! amount it applies to; the chosen combination gives the largest discount any allowed
//! combination gives; its parts, per line and per coupon, add up to it exactly.
//!
//! # Rules
//!
//! **The cart.** 1..=`max_items` lines; each has a `product_id` and optionally a
//! `category_id` and a `merchant_id` (1-128 characters, no control characters: [`valid_ref`]),
//! a `unit_price >= 0` and a `quantity >= 1`. A line's amount is `unit_price * quantity`;
//! the total is the sum of the amounts. An overflow anywhere is an invalid cart.
//!
//! **Usable.** A coupon is usable when, checked in this order (the first failure is its
//! reason): it is not `locked` (held for an order) or `used`; `now` is within its validity
//! (`expired` after `valid_to`, `not_yet_valid` before `valid_from`); its batch is known
//! (`unknown_batch`); at least one line is in its batch's scope (`out_of_scope`: scope
//! `all` takes every line, `products` / `categories` / `merchants` the lines whose product /
//! category / merchant id is listed); and, for a threshold discount, the in-scope subtotal
//! (the sum of the in-scope lines' amounts, before any discount) reaches the threshold
//! (`below_threshold`).
//!
//! **A coupon's discount** (its *nominal* discount) is computed on the cart as sent, over
//! the in-scope subtotal `S`: threshold and fixed give `min(amount, S)`; percent gives
//! `floor(S * percent_off / 100)` (rounded down to the minor unit), capped by `max_off`
//! when set and by `S`. So it never exceeds what it applies to.
//!
//! **Combinations.** Either one exclusive coupon alone, or a *stack*: any set of
//! non-exclusive coupons with at most one coupon per batch (two coupons of one batch never
//! combine). A stack's discount is the largest total that can be spread over the lines so
//! that each coupon gives at most its nominal discount, only on its in-scope lines, and no
//! line is discounted beyond its amount (the maximum flow of the network source -> coupon
//! (capacity: nominal) -> in-scope line -> sink (capacity: the line's amount)). So a stack
//! never exceeds the cart, and a coupon whose lines the others already used up adds
//! nothing.
//!
//! **The best combination** maximises the discount; ties go to fewer coupons, then to the
//! smaller first coupon id. Why this is exact and bounded although a wallet of 50 coupons
//! has 2^50 subsets: adding a coupon to a stack never lowers its discount (a flow of the
//! smaller network is a flow of the larger one), so the stack of *every* usable
//! non-exclusive batch (one coupon each: the one giving most, then expiring first, then the
//! smallest id) is at least as good as any other stack; the best combination is the better
//! of that stack and the best exclusive coupon. A coupon of the stack that ends up giving
//! nothing is left out (removing a zero-flow source keeps the flow). Cost: one maximum flow
//! over at most `coupons + lines + 2` nodes. The unit tests check this against brute force
//! over every combination of small random wallets, with the stack values computed by the
//! independent min-cut formula.
//!
//! **Apportioning.** One coupon's discount is split over its in-scope lines in proportion
//! to their amounts by the largest-remainder method ([`apportion`]: each part rounded down,
//! then the leftover minor units one each to the largest remainders, ties to the lower line
//! index), so the parts add up exactly and no part exceeds its line's amount. A stack is
//! built the same way, coupon after coupon in a fixed order (products, then categories, then
//! merchants, then all; larger nominal first; then coupon id), each split over what the
//! earlier ones left of its lines; when that greedy split falls short of the maximum (a
//! broad coupon used up a line a narrower one needed), the allocation is completed by
//! augmenting paths, which move minor units between lines without changing any line's
//! bound. Every coupon's parts and every line's share are reported, and each adds up.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::batch::{Batch, Discount, ScopeKind};
use super::time::Timestamp;

/// Longest product, category or merchant id, in characters.
pub const MAX_REF_CHARS: usize = 128;

/// A product, category or merchant id as a cart or a product page names it: 1-128 characters,
/// no control characters (scope ids are matched exactly, byte for byte).
pub fn valid_ref(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_REF_CHARS && !s.chars().any(char::is_control)
}

/// Highest `unit_price` of a cart line, minor units (a hundred million in major units of a
/// two-decimal currency).
pub const MAX_UNIT_PRICE: i64 = 10_000_000_000;
/// Highest `quantity` of a cart line. With [`MAX_UNIT_PRICE`], a line's amount is at most
/// 10^15, and a cart of the most lines `checkout.max_items` allows (1000) at most 10^18,
/// below 2^63: no valid cart overflows.
pub const MAX_QUANTITY: i64 = 100_000;

/// One line of the cart, as the client sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub product_id: String,
    #[serde(default)]
    pub category_id: Option<String>,
    #[serde(default)]
    pub merchant_id: Option<String>,
    #[serde(deserialize_with = "whole_number")]
    pub unit_price: i64,
    #[serde(deserialize_with = "whole_number")]
    pub quantity: i64,
}

/// An integer, also when written `2.0` (JSON does not tell them apart, and JSON Schema's
/// `integer` accepts both); a fraction or a value outside i64 is refused.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::de::Error;
    let n = serde_json::Number::deserialize(d)?;
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    match n.as_f64() {
        // 2^63 is exactly representable: anything below it converts without loss
        Some(f) if f.fract() == 0.0 && f >= -(2f64.powi(63)) && f < 2f64.powi(63) => Ok(f as i64),
        _ => Err(D::Error::custom(format!(
            "expected a whole number, got {n}"
        ))),
    }
}

/// Why a cart is refused (a 400 `bad_request`).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidCart(pub String);

/// A validated cart: its lines, each line's amount and the total.
#[derive(Debug, Clone)]
pub struct Cart {
    items: Vec<Item>,
    amounts: Vec<i64>,
    total: i64,
}

impl Cart {
    /// Checks every line (see the module documentation) and computes the amounts.
    pub fn new(items: Vec<Item>, max_items: usize) -> Result<Cart, InvalidCart> {
        let bad = |m: String| Err(InvalidCart(m));
        if items.is_empty() {
            return bad("items must not be empty".into());
        }
        if items.len() > max_items {
            return bad(format!(
                "at most {max_items} items (checkout.max_items), got {}",
                items.len()
            ));
        }
        let mut amounts = Vec::with_capacity(items.len());
        let mut total: i64 = 0;
        for (i, it) in items.iter().enumerate() {
            let refs = [
                ("product_id", Some(&it.product_id)),
                ("category_id", it.category_id.as_ref()),
                ("merchant_id", it.merchant_id.as_ref()),
            ];
            for (name, v) in refs {
                if v.is_some_and(|v| !valid_ref(v)) {
                    return bad(format!(
                        "items[{i}].{name} must be 1-{MAX_REF_CHARS} characters without control characters"
                    ));
                }
            }
            if !(0..=MAX_UNIT_PRICE).contains(&it.unit_price) {
                return bad(format!(
                    "items[{i}].unit_price must be 0..={MAX_UNIT_PRICE}"
                ));
            }
            if !(1..=MAX_QUANTITY).contains(&it.quantity) {
                return bad(format!("items[{i}].quantity must be 1..={MAX_QUANTITY}"));
            }
            let Some(amount) = it.unit_price.checked_mul(it.quantity) else {
                return bad(format!(
                    "items[{i}]: unit_price * quantity does not fit a 64-bit amount"
                ));
            };
            let Some(t) = total.checked_add(amount) else {
                return bad("the cart total does not fit a 64-bit amount".into());
            };
            total = t;
            amounts.push(amount);
        }
        Ok(Cart {
            items,
            amounts,
            total,
        })
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// Each line's amount (`unit_price * quantity`), in line order.
    pub fn amounts(&self) -> &[i64] {
        &self.amounts
    }

    pub fn total(&self) -> i64 {
        self.total
    }
}

/// What a batch's coupons do at checkout: the discount, the scope (with its ids as a set,
/// so matching a line costs one lookup) and whether they combine.
#[derive(Debug, Clone)]
pub struct Terms {
    pub discount: Discount,
    pub scope: ScopeKind,
    pub ids: Arc<HashSet<Box<str>>>,
    pub exclusive: bool,
}

impl Terms {
    /// The terms of `batch`, with its scope ids already collected in `ids`.
    pub fn with_ids(batch: &Batch, ids: Arc<HashSet<Box<str>>>) -> Terms {
        Terms {
            discount: batch.discount.clone(),
            scope: batch.scope.kind,
            ids,
            exclusive: batch.exclusive,
        }
    }

    /// The terms of `batch` (collects its scope ids).
    pub fn of(batch: &Batch) -> Terms {
        Terms::with_ids(batch, Arc::new(scope_set(batch)))
    }

    /// Does the scope take this line?
    pub fn applies(&self, item: &Item) -> bool {
        let id = match self.scope {
            ScopeKind::All => return true,
            ScopeKind::Products => Some(item.product_id.as_str()),
            ScopeKind::Categories => item.category_id.as_deref(),
            ScopeKind::Merchants => item.merchant_id.as_deref(),
        };
        id.is_some_and(|id| self.ids.contains(id))
    }
}

/// The scope ids of a batch as a set.
pub fn scope_set(batch: &Batch) -> HashSet<Box<str>> {
    batch
        .scope
        .ids
        .iter()
        .map(|s| Box::from(s.as_str()))
        .collect()
}

/// A coupon's state as the wallet reads it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Unused,
    Locked,
    Used,
    Expired,
}

/// One coupon of the user's, with its batch's terms (`None`: the batch is unknown).
#[derive(Debug, Clone)]
pub struct Offer {
    pub coupon_id: String,
    pub batch_id: String,
    pub state: Held,
    pub valid_from: Timestamp,
    pub valid_to: Timestamp,
    pub terms: Option<Terms>,
}

/// Why a coupon cannot be used on this cart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Locked,
    Used,
    Expired,
    NotYetValid,
    UnknownBatch,
    OutOfScope,
    BelowThreshold,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Usable {
    pub coupon_id: String,
    pub batch_id: String,
    /// The coupon's nominal discount on this cart (alone).
    pub discount: i64,
    pub exclusive: bool,
    pub valid_to: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unusable {
    pub coupon_id: String,
    pub batch_id: String,
    pub reason: Reason,
}

/// A line's part of a discount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Part {
    pub line: usize,
    pub discount: i64,
}

/// A coupon of the best combination: what it gives, and on which lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub coupon_id: String,
    pub batch_id: String,
    pub discount: i64,
    /// Its parts, lines without a part left out; they add up to `discount`.
    pub lines: Vec<Part>,
}

/// One cart line under the best combination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineShare {
    pub line: usize,
    pub amount: i64,
    /// This line's share of the combination's discount (<= `amount`).
    pub discount: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Best {
    pub coupon_ids: Vec<String>,
    pub discount: i64,
    pub coupons: Vec<Applied>,
    /// Every cart line, in order; the shares add up to `discount`.
    pub lines: Vec<LineShare>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quote {
    pub total: i64,
    /// Largest discount first, then by coupon id.
    pub usable: Vec<Usable>,
    /// By coupon id.
    pub unusable: Vec<Unusable>,
    pub best: Best,
}

/// A usable coupon, evaluated.
struct Candidate<'a> {
    offer: &'a Offer,
    terms: &'a Terms,
    /// Its in-scope lines, ascending.
    lines: Vec<usize>,
    nominal: i64,
}

/// The nominal discount on an in-scope subtotal (see the module documentation).
fn nominal(discount: &Discount, in_scope: i64) -> Result<i64, Reason> {
    let d = match *discount {
        Discount::Threshold { threshold, amount } => {
            if in_scope < threshold {
                return Err(Reason::BelowThreshold);
            }
            amount
        }
        Discount::Fixed { amount } => amount,
        Discount::Percent {
            percent_off,
            max_off,
        } => {
            // i128: in_scope * percent_off cannot overflow; the quotient is <= in_scope
            // for percent_off <= 100 (validated), and clamped below anyway.
            let raw = i128::from(in_scope) * i128::from(percent_off) / 100;
            let raw = i64::try_from(raw.clamp(0, i128::from(in_scope))).unwrap_or(in_scope);
            max_off.map_or(raw, |m| raw.min(m))
        }
    };
    Ok(d.clamp(0, in_scope.max(0)))
}

/// Splits `x` over `weights` in proportion, by the largest-remainder method: each part is
/// `floor(x * w / sum)`, then the leftover units go one each to the largest remainders,
/// ties to the lower index. With `0 <= x <= sum(weights)` and weights >= 0 the parts add up
/// to `x` and none exceeds its weight (a part is rounded up only when its exact share has
/// a fraction, so it stays below its integer weight). `x` above the sum is cut to the sum.
pub fn apportion(x: i64, weights: &[i64]) -> Vec<i64> {
    let sum: i128 = weights.iter().map(|&w| i128::from(w.max(0))).sum();
    let mut parts = vec![0i64; weights.len()];
    if x <= 0 || sum == 0 {
        return parts;
    }
    let x = i128::from(x).min(sum);
    let mut rems: Vec<(i128, usize)> = Vec::with_capacity(weights.len());
    let mut given: i128 = 0;
    for (i, &w) in weights.iter().enumerate() {
        let q = x * i128::from(w.max(0));
        let p = q / sum;
        // p <= w <= i64::MAX
        parts[i] = i64::try_from(p).unwrap_or(i64::MAX);
        given += p;
        rems.push((q % sum, i));
    }
    let left = usize::try_from(x - given).unwrap_or(0);
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rems.iter().take(left) {
        parts[i] += 1;
    }
    parts
}

/// The quote for `cart` and the user's coupons at `now`.
pub fn quote(cart: &Cart, offers: &[Offer], now: Timestamp) -> Quote {
    let amounts = cart.amounts();
    let mut usable_c: Vec<Candidate<'_>> = Vec::new();
    let mut unusable = Vec::new();
    for offer in offers {
        match evaluate(cart, offer, now) {
            Ok(c) => usable_c.push(c),
            Err(reason) => unusable.push(Unusable {
                coupon_id: offer.coupon_id.clone(),
                batch_id: offer.batch_id.clone(),
                reason,
            }),
        }
    }
    unusable.sort_by(|a, b| a.coupon_id.cmp(&b.coupon_id));
    let mut usable: Vec<Usable> = usable_c
        .iter()
        .map(|c| Usable {
            coupon_id: c.offer.coupon_id.clone(),
            batch_id: c.offer.batch_id.clone(),
            discount: c.nominal,
            exclusive: c.terms.exclusive,
            valid_to: c.offer.valid_to,
        })
        .collect();
    usable.sort_by(|a, b| {
        b.discount
            .cmp(&a.discount)
            .then_with(|| a.coupon_id.cmp(&b.coupon_id))
    });

    // The best exclusive coupon: largest discount, then expiring first, then smallest id.
    let exclusive = usable_c
        .iter()
        .filter(|c| c.terms.exclusive && c.nominal > 0)
        .min_by(|a, b| preference(a, b));
    let stack = best_stack(&usable_c, amounts);
    let stack_total: i64 = stack.iter().map(|a| a.discount).sum();

    let chosen: Vec<Applied> = match exclusive {
        Some(ex) if beats(ex, stack_total, &stack) => {
            let weights: Vec<i64> = ex.lines.iter().map(|&l| amounts[l]).collect();
            let parts = apportion(ex.nominal, &weights);
            vec![Applied {
                coupon_id: ex.offer.coupon_id.clone(),
                batch_id: ex.offer.batch_id.clone(),
                discount: ex.nominal,
                lines: ex
                    .lines
                    .iter()
                    .zip(parts)
                    .filter(|(_, p)| *p > 0)
                    .map(|(&line, discount)| Part { line, discount })
                    .collect(),
            }]
        }
        _ => stack,
    };
    let mut shares = vec![0i64; amounts.len()];
    for a in &chosen {
        for p in &a.lines {
            shares[p.line] += p.discount;
        }
    }
    let best = Best {
        coupon_ids: chosen.iter().map(|a| a.coupon_id.clone()).collect(),
        discount: chosen.iter().map(|a| a.discount).sum(),
        lines: amounts
            .iter()
            .zip(shares)
            .enumerate()
            .map(|(line, (&amount, discount))| LineShare {
                line,
                amount,
                discount,
            })
            .collect(),
        coupons: chosen,
    };
    Quote {
        total: cart.total(),
        usable,
        unusable,
        best,
    }
}

/// Does the exclusive coupon beat the stack? Larger discount wins; on a tie, fewer
/// coupons, then the smaller first coupon id.
fn beats(ex: &Candidate<'_>, stack_total: i64, stack: &[Applied]) -> bool {
    match ex.nominal.cmp(&stack_total) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => match 1.cmp(&stack.len()) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => stack
                .first()
                .is_none_or(|s| ex.offer.coupon_id < s.coupon_id),
        },
    }
}

/// Orders candidates best first: larger nominal, then earlier `valid_to`, then smaller id.
fn preference(a: &Candidate<'_>, b: &Candidate<'_>) -> std::cmp::Ordering {
    b.nominal
        .cmp(&a.nominal)
        .then(a.offer.valid_to.cmp(&b.offer.valid_to))
        .then_with(|| a.offer.coupon_id.cmp(&b.offer.coupon_id))
}

fn evaluate<'a>(cart: &Cart, offer: &'a Offer, now: Timestamp) -> Result<Candidate<'a>, Reason> {
    match offer.state {
        Held::Locked => return Err(Reason::Locked),
        Held::Used => return Err(Reason::Used),
        Held::Expired => return Err(Reason::Expired),
        Held::Unused => {}
    }
    if now > offer.valid_to {
        return Err(Reason::Expired);
    }
    if now < offer.valid_from {
        return Err(Reason::NotYetValid);
    }
    let terms = offer.terms.as_ref().ok_or(Reason::UnknownBatch)?;
    let lines: Vec<usize> = cart
        .items()
        .iter()
        .enumerate()
        .filter(|(_, it)| terms.applies(it))
        .map(|(i, _)| i)
        .collect();
    if lines.is_empty() {
        return Err(Reason::OutOfScope);
    }
    // <= the cart total, which fits an i64
    let in_scope: i64 = lines.iter().map(|&l| cart.amounts()[l]).sum();
    let nominal = nominal(&terms.discount, in_scope)?;
    Ok(Candidate {
        offer,
        terms,
        lines,
        nominal,
    })
}

/// The order a stack is built in: narrower scopes first.
fn specificity(kind: ScopeKind) -> u8 {
    match kind {
        ScopeKind::Products => 0,
        ScopeKind::Categories => 1,
        ScopeKind::Merchants => 2,
        ScopeKind::All => 3,
    }
}

/// The stack of every usable non-exclusive batch (its preferred coupon), allocated: the
/// greedy proportional split completed to a maximum flow. Coupons giving nothing are left
/// out.
fn best_stack(usable: &[Candidate<'_>], amounts: &[i64]) -> Vec<Applied> {
    let mut per_batch: HashMap<&str, &Candidate<'_>> = HashMap::new();
    for c in usable
        .iter()
        .filter(|c| !c.terms.exclusive && c.nominal > 0)
    {
        per_batch
            .entry(c.offer.batch_id.as_str())
            .and_modify(|cur| {
                if preference(c, cur).is_lt() {
                    *cur = c;
                }
            })
            .or_insert(c);
    }
    let mut stack: Vec<&Candidate<'_>> = per_batch.into_values().collect();
    stack.sort_by(|a, b| {
        specificity(a.terms.scope)
            .cmp(&specificity(b.terms.scope))
            .then(b.nominal.cmp(&a.nominal))
            .then_with(|| a.offer.coupon_id.cmp(&b.offer.coupon_id))
    });

    // 1. greedy: each coupon split over what the earlier ones left of its lines
    let mut remaining = amounts.to_vec();
    let mut flows: Vec<Vec<i64>> = Vec::with_capacity(stack.len());
    for c in &stack {
        let weights: Vec<i64> = c.lines.iter().map(|&l| remaining[l]).collect();
        let parts = apportion(c.nominal, &weights);
        for (&l, &p) in c.lines.iter().zip(&parts) {
            remaining[l] -= p;
        }
        flows.push(parts);
    }

    // 2. completed to a maximum flow by augmenting paths from that allocation
    let (k, n) = (stack.len(), amounts.len());
    let (s, t) = (0, k + n + 1);
    let mut net = Network::new(k + n + 2);
    let mut edges: Vec<Vec<usize>> = Vec::with_capacity(k);
    for (ci, c) in stack.iter().enumerate() {
        let given: i64 = flows[ci].iter().sum();
        net.add(s, 1 + ci, c.nominal, given);
        edges.push(
            c.lines
                .iter()
                .zip(&flows[ci])
                .map(|(&l, &f)| net.add(1 + ci, 1 + k + l, amounts[l], f))
                .collect(),
        );
    }
    for (l, &a) in amounts.iter().enumerate() {
        net.add(1 + k + l, t, a, a - remaining[l]);
    }
    net.augment(s, t);

    stack
        .iter()
        .zip(&edges)
        .filter_map(|(c, es)| {
            let lines: Vec<Part> = c
                .lines
                .iter()
                .zip(es)
                .map(|(&line, &e)| Part {
                    line,
                    discount: net.flow(e),
                })
                .filter(|p| p.discount > 0)
                .collect();
            let discount: i64 = lines.iter().map(|p| p.discount).sum();
            (discount > 0).then(|| Applied {
                coupon_id: c.offer.coupon_id.clone(),
                batch_id: c.offer.batch_id.clone(),
                discount,
                lines,
            })
        })
        .collect()
}

/// A flow network (Dinic's algorithm) that starts from a given feasible flow.
struct Network {
    adj: Vec<Vec<usize>>,
    to: Vec<usize>,
    /// Residual capacity of each edge; edge `e ^ 1` is the reverse of `e`.
    residual: Vec<i64>,
    capacity: Vec<i64>,
    level: Vec<i32>,
    next: Vec<usize>,
}

impl Network {
    fn new(nodes: usize) -> Network {
        Network {
            adj: vec![Vec::new(); nodes],
            to: Vec::new(),
            residual: Vec::new(),
            capacity: Vec::new(),
            level: vec![-1; nodes],
            next: vec![0; nodes],
        }
    }

    /// An edge `u -> v` of capacity `cap` already carrying `flow` (`0 <= flow <= cap`).
    fn add(&mut self, u: usize, v: usize, cap: i64, flow: i64) -> usize {
        let e = self.to.len();
        self.to.push(v);
        self.residual.push(cap - flow);
        self.capacity.push(cap);
        self.adj[u].push(e);
        self.to.push(u);
        self.residual.push(flow);
        self.capacity.push(0);
        self.adj[v].push(e + 1);
        e
    }

    fn flow(&self, e: usize) -> i64 {
        self.capacity[e] - self.residual[e]
    }

    /// Augments until no path from `s` to `t` is left (the flow is then maximum).
    fn augment(&mut self, s: usize, t: usize) {
        while self.levels(s, t) {
            self.next.iter_mut().for_each(|n| *n = 0);
            while self.push(s, t, i64::MAX) > 0 {}
        }
    }

    fn levels(&mut self, s: usize, t: usize) -> bool {
        self.level.iter_mut().for_each(|l| *l = -1);
        self.level[s] = 0;
        let mut queue = std::collections::VecDeque::from([s]);
        while let Some(u) = queue.pop_front() {
            for &e in &self.adj[u] {
                let v = self.to[e];
                if self.residual[e] > 0 && self.level[v] < 0 {
                    self.level[v] = self.level[u] + 1;
                    queue.push_back(v);
                }
            }
        }
        self.level[t] >= 0
    }

    /// One blocking-flow path (depth <= the number of nodes: levels strictly rise).
    fn push(&mut self, u: usize, t: usize, limit: i64) -> i64 {
        if u == t {
            return limit;
        }
        while self.next[u] < self.adj[u].len() {
            let e = self.adj[u][self.next[u]];
            let v = self.to[e];
            if self.residual[e] > 0 && self.level[v] == self.level[u] + 1 {
                let got = self.push(v, t, limit.min(self.residual[e]));
                if got > 0 {
                    self.residual[e] -= got;
                    self.residual[e ^ 1] += got;
                    return got;
                }
            }
            self.next[u] += 1;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_may_be_written_as_floats() {
        let item = |q: &str| {
            serde_json::from_str::<Item>(&format!(
                r#"{{"product_id":"p","unit_price":5,"quantity":{q}}}"#
            ))
        };
        assert_eq!(item("2.0").unwrap().quantity, 2);
        assert_eq!(item("3").unwrap().quantity, 3);
        assert!(item("2.5").is_err());
        assert!(item("1e300").is_err());
        assert!(item("\"2\"").is_err());
    }

    #[test]
    fn refs_count_characters_and_refuse_control_characters() {
        assert!(
            valid_ref(&"é".repeat(MAX_REF_CHARS)),
            "128 two-byte characters"
        );
        assert!(!valid_ref(&"a".repeat(MAX_REF_CHARS + 1)));
        assert!(!valid_ref(""));
        assert!(!valid_ref("a\u{3}b"), "C0 control");
        assert!(!valid_ref("a\u{85}b"), "C1 control");
    }
    use crate::domain::batch::{BatchState, Eligibility, Scope, Validity, Window};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const NOW: Timestamp = Timestamp(1_000_000);

    fn item(p: &str, c: &str, m: &str, price: i64, qty: i64) -> Item {
        Item {
            product_id: p.into(),
            category_id: Some(c.into()),
            merchant_id: Some(m.into()),
            unit_price: price,
            quantity: qty,
        }
    }

    fn batch(id: &str, discount: Discount, kind: ScopeKind, ids: &[&str], ex: bool) -> Batch {
        Batch {
            id: id.into(),
            name: "n".into(),
            stock: 10,
            per_user_limit: 1,
            per_user_daily_limit: None,
            claim_window: Window {
                start: Timestamp(0),
                end: Timestamp(10),
            },
            validity: Validity::Relative {
                days_after_claim: 1,
            },
            discount,
            scope: Scope {
                kind,
                ids: ids.iter().map(|s| s.to_string()).collect(),
            },
            exclusive: ex,
            eligibility: Eligibility::default(),
            shards: 1,
            state: BatchState::Active,
            created_at: Timestamp(0),
            ack: None,
            timezone: None,
            budget: None,
            codes: None,
        }
    }

    fn offer(coupon: &str, b: &Batch) -> Offer {
        Offer {
            coupon_id: coupon.into(),
            batch_id: b.id.clone(),
            state: Held::Unused,
            valid_from: Timestamp(0),
            valid_to: Timestamp(2_000_000),
            terms: Some(Terms::of(b)),
        }
    }

    fn cart(items: Vec<Item>) -> Cart {
        Cart::new(items, 100).unwrap()
    }

    fn thr(threshold: i64, amount: i64) -> Discount {
        Discount::Threshold { threshold, amount }
    }
    fn fixed(amount: i64) -> Discount {
        Discount::Fixed { amount }
    }
    fn pct(percent_off: i64, max_off: Option<i64>) -> Discount {
        Discount::Percent {
            percent_off,
            max_off,
        }
    }

    #[test]
    fn carts_are_validated() {
        let ok = item("p", "c", "m", 100, 2);
        assert_eq!(cart(vec![ok.clone()]).total(), 200);
        for (items, want) in [
            (vec![], "empty"),
            (vec![ok.clone(); 101], "at most 100"),
            (vec![item("p", "c", "m", -1, 1)], "unit_price"),
            (vec![item("p", "c", "m", 1, 0)], "quantity"),
            (vec![item("p", "c", "m", 1, -3)], "quantity"),
            (vec![item("", "c", "m", 1, 1)], "product_id"),
            (vec![item("p\n", "c", "m", 1, 1)], "product_id"),
            (vec![item("p", &"c".repeat(129), "m", 1, 1)], "category_id"),
            // bounded so that no valid cart overflows (schemathesis found the overflow 400)
            (
                vec![item("p", "c", "m", MAX_UNIT_PRICE + 1, 2)],
                "unit_price",
            ),
            (vec![item("p", "c", "m", 1, MAX_QUANTITY + 1)], "quantity"),
        ] {
            let e = Cart::new(items, 100).unwrap_err();
            assert!(e.0.contains(want), "{e} should name {want}");
        }
        // the largest cart the bounds allow fits (checkout.max_items is at most 1000)
        let max = item("p", "c", "m", MAX_UNIT_PRICE, MAX_QUANTITY);
        assert!(Cart::new(vec![max; 1000], 1000).is_ok());
        // a line without category or merchant is fine, and free lines too
        let mut bare = item("p", "c", "m", 0, 1);
        bare.category_id = None;
        bare.merchant_id = None;
        assert_eq!(cart(vec![bare]).total(), 0);
    }

    #[test]
    fn largest_remainder_apportioning() {
        assert_eq!(apportion(10, &[10, 10, 10]), vec![4, 3, 3]);
        assert_eq!(apportion(2, &[1, 1, 1]), vec![1, 1, 0]);
        assert_eq!(apportion(7, &[100, 0, 300]), vec![2, 0, 5]);
        assert_eq!(apportion(5, &[5]), vec![5]);
        assert_eq!(apportion(9, &[5]), vec![5], "cut to the weights");
        assert_eq!(apportion(0, &[5, 5]), vec![0, 0]);
        assert_eq!(apportion(3, &[0, 0]), vec![0, 0]);
        assert_eq!(apportion(i64::MAX, &[i64::MAX, 0]), vec![i64::MAX, 0]);
        let big = apportion(i64::MAX - 1, &[i64::MAX / 2, i64::MAX / 2]);
        assert_eq!(
            big.iter().map(|&p| i128::from(p)).sum::<i128>(),
            i128::from(i64::MAX - 1)
        );
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let n = rng.random_range(1..8);
            let w: Vec<i64> = (0..n).map(|_| rng.random_range(0..50)).collect();
            let sum: i64 = w.iter().sum();
            let x = rng.random_range(0..=sum);
            let p = apportion(x, &w);
            assert_eq!(p.iter().sum::<i64>(), x, "{w:?} {x}");
            assert!(
                p.iter().zip(&w).all(|(p, w)| 0 <= *p && p <= w),
                "{w:?} {x} {p:?}"
            );
        }
    }

    /// Table: each discount kind and each scope kind, alone.
    #[test]
    fn each_discount_kind_and_scope() {
        let c = cart(vec![
            item("p1", "shoes", "acme", 3000, 2),  // 6000
            item("p2", "shirts", "acme", 1999, 1), // 1999
            item("p3", "shoes", "other", 1001, 3), // 3003
        ]);
        assert_eq!(c.total(), 11_002);
        type Case = (
            &'static str,
            Discount,
            ScopeKind,
            &'static [&'static str],
            Result<i64, Reason>,
        );
        let cases: Vec<Case> = vec![
            (
                "all threshold met",
                thr(10_000, 500),
                ScopeKind::All,
                &[],
                Ok(500),
            ),
            (
                "all threshold exact",
                thr(11_002, 500),
                ScopeKind::All,
                &[],
                Ok(500),
            ),
            (
                "all threshold missed",
                thr(11_003, 500),
                ScopeKind::All,
                &[],
                Err(Reason::BelowThreshold),
            ),
            (
                "threshold on the in-scope subtotal",
                thr(6_001, 500),
                ScopeKind::Products,
                &["p1"],
                Err(Reason::BelowThreshold),
            ),
            (
                "threshold zero",
                thr(0, 700),
                ScopeKind::Products,
                &["p2"],
                Ok(700),
            ),
            (
                "threshold amount capped by scope",
                thr(1_000, 5_000),
                ScopeKind::Products,
                &["p2"],
                Ok(1_999),
            ),
            (
                "fixed",
                fixed(300),
                ScopeKind::Categories,
                &["shirts"],
                Ok(300),
            ),
            (
                "fixed capped by scope",
                fixed(9_999),
                ScopeKind::Categories,
                &["shirts"],
                Ok(1_999),
            ),
            (
                "percent rounds down",
                pct(15, None),
                ScopeKind::Merchants,
                &["other"],
                Ok(450),
            ), // 450.45
            (
                "percent capped by max_off",
                pct(50, Some(1_000)),
                ScopeKind::All,
                &[],
                Ok(1_000),
            ),
            (
                "percent 100",
                pct(100, None),
                ScopeKind::Products,
                &["p1", "p3"],
                Ok(9_003),
            ),
            (
                "percent of a category",
                pct(10, None),
                ScopeKind::Categories,
                &["shoes"],
                Ok(900),
            ), // 900.3
            (
                "merchant scope",
                fixed(100),
                ScopeKind::Merchants,
                &["acme"],
                Ok(100),
            ),
            (
                "out of scope product",
                fixed(100),
                ScopeKind::Products,
                &["nope"],
                Err(Reason::OutOfScope),
            ),
            (
                "out of scope category",
                pct(10, None),
                ScopeKind::Categories,
                &["hats"],
                Err(Reason::OutOfScope),
            ),
            (
                "out of scope merchant",
                thr(0, 1),
                ScopeKind::Merchants,
                &["zzz"],
                Err(Reason::OutOfScope),
            ),
        ];
        for (name, d, kind, ids, want) in cases {
            let b = batch("b", d, kind, ids, false);
            let q = quote(&c, &[offer("b.0.1", &b)], NOW);
            match want {
                Ok(amount) => {
                    assert_eq!(q.usable.len(), 1, "{name}");
                    assert_eq!(q.usable[0].discount, amount, "{name}");
                    assert_eq!(q.best.discount, amount, "{name}");
                    // apportioned over the in-scope lines only, by largest remainder
                    let t = Terms::of(&b);
                    let in_scope: Vec<usize> =
                        (0..3).filter(|&i| t.applies(&c.items()[i])).collect();
                    let w: Vec<i64> = in_scope.iter().map(|&i| c.amounts()[i]).collect();
                    let want_parts = apportion(amount, &w);
                    for (j, &i) in in_scope.iter().enumerate() {
                        assert_eq!(q.best.lines[i].discount, want_parts[j], "{name} line {i}");
                    }
                    for l in &q.best.lines {
                        if !in_scope.contains(&l.line) {
                            assert_eq!(l.discount, 0, "{name}: out-of-scope line {}", l.line);
                        }
                    }
                }
                Err(reason) => {
                    assert!(q.usable.is_empty(), "{name}");
                    assert_eq!(q.unusable[0].reason, reason, "{name}");
                    assert_eq!(q.best.discount, 0, "{name}");
                    assert!(q.best.coupon_ids.is_empty(), "{name}");
                }
            }
        }
    }

    #[test]
    fn states_and_validity_come_before_scope() {
        let c = cart(vec![item("p1", "c", "m", 1000, 1)]);
        let b = batch("b", fixed(100), ScopeKind::Products, &["nope"], false);
        let mut offers = Vec::new();
        for (id, state, from, to) in [
            ("c1", Held::Locked, 0, 2_000_000),
            ("c2", Held::Used, 0, 2_000_000),
            ("c3", Held::Expired, 0, 2_000_000),
            ("c4", Held::Unused, 0, NOW.0 - 1),
            ("c5", Held::Unused, NOW.0 + 1, 2_000_000),
            ("c6", Held::Unused, 0, 2_000_000),
        ] {
            let mut o = offer(id, &b);
            o.state = state;
            o.valid_from = Timestamp(from);
            o.valid_to = Timestamp(to);
            offers.push(o);
        }
        let mut unknown = offer("c7", &b);
        unknown.terms = None;
        offers.push(unknown);
        // valid exactly at both ends
        let mut edge = offer("c8", &batch("e", fixed(5), ScopeKind::All, &[], false));
        edge.valid_from = NOW;
        edge.valid_to = NOW;
        offers.push(edge);
        let q = quote(&c, &offers, NOW);
        let reasons: Vec<(&str, Reason)> = q
            .unusable
            .iter()
            .map(|u| (u.coupon_id.as_str(), u.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("c1", Reason::Locked),
                ("c2", Reason::Used),
                ("c3", Reason::Expired),
                ("c4", Reason::Expired),
                ("c5", Reason::NotYetValid),
                ("c6", Reason::OutOfScope),
                ("c7", Reason::UnknownBatch),
            ]
        );
        assert_eq!(q.best.coupon_ids, vec!["c8"]);
    }

    #[test]
    fn exclusive_alone_or_the_stack_whichever_gives_more() {
        let c = cart(vec![
            item("p1", "shoes", "acme", 5000, 1),
            item("p2", "shirts", "acme", 5000, 1),
        ]);
        let ex = batch("ex", fixed(1500), ScopeKind::All, &[], true);
        let s1 = batch("s1", fixed(800), ScopeKind::Products, &["p1"], false);
        let s2 = batch("s2", pct(10, None), ScopeKind::All, &[], false);
        // stack: 800 + 1000 = 1800 > 1500
        let q = quote(
            &c,
            &[
                offer("ex.0.1", &ex),
                offer("s1.0.1", &s1),
                offer("s2.0.1", &s2),
            ],
            NOW,
        );
        assert_eq!(q.best.discount, 1800);
        assert_eq!(q.best.coupon_ids, vec!["s1.0.1", "s2.0.1"]);
        // the exclusive wins once it gives more
        let ex = batch("ex", fixed(2000), ScopeKind::All, &[], true);
        let q = quote(
            &c,
            &[
                offer("ex.0.1", &ex),
                offer("s1.0.1", &s1),
                offer("s2.0.1", &s2),
            ],
            NOW,
        );
        assert_eq!(
            (q.best.discount, q.best.coupon_ids.clone()),
            (2000, vec!["ex.0.1".to_string()])
        );
        assert_eq!(
            q.best.lines.iter().map(|l| l.discount).collect::<Vec<_>>(),
            vec![1000, 1000]
        );
        // a tie goes to fewer coupons
        let ex = batch("ex", fixed(1800), ScopeKind::All, &[], true);
        let q = quote(
            &c,
            &[
                offer("ex.0.1", &ex),
                offer("s1.0.1", &s1),
                offer("s2.0.1", &s2),
            ],
            NOW,
        );
        assert_eq!(q.best.coupon_ids, vec!["ex.0.1"]);
        // two exclusives never combine; the larger wins
        let ex2 = batch("ex2", fixed(1900), ScopeKind::All, &[], true);
        let q = quote(&c, &[offer("ex.0.1", &ex), offer("ex2.0.1", &ex2)], NOW);
        assert_eq!(
            (q.best.discount, q.best.coupon_ids.clone()),
            (1900, vec!["ex2.0.1".to_string()])
        );
    }

    #[test]
    fn one_coupon_per_batch_the_one_expiring_first() {
        let c = cart(vec![item("p1", "c", "m", 10_000, 1)]);
        let b = batch("b", fixed(100), ScopeKind::All, &[], false);
        let mut late = offer("b.0.1", &b);
        late.valid_to = Timestamp(3_000_000);
        let early = offer("b.0.2", &b);
        let q = quote(&c, &[late, early], NOW);
        assert_eq!(q.usable.len(), 2);
        assert_eq!(q.best.coupon_ids, vec!["b.0.2"]);
        assert_eq!(q.best.discount, 100);
    }

    #[test]
    fn a_stack_never_exceeds_the_cart_and_drops_coupons_that_add_nothing() {
        let c = cart(vec![
            item("p1", "c", "m", 1000, 1),
            item("p2", "c", "m", 50, 1),
        ]);
        let a = batch("a", fixed(900), ScopeKind::Products, &["p1"], false);
        let b = batch("b", fixed(900), ScopeKind::Products, &["p1"], false);
        let all = batch("all", fixed(500), ScopeKind::All, &[], false);
        let q = quote(
            &c,
            &[
                offer("a.0.1", &a),
                offer("b.0.1", &b),
                offer("all.0.1", &all),
            ],
            NOW,
        );
        assert_eq!(q.best.discount, 1050, "the whole cart, no more");
        let shares: Vec<i64> = q.best.lines.iter().map(|l| l.discount).collect();
        assert_eq!(shares, vec![1000, 50]);
        // a third coupon on p1 alone adds nothing once p1 is used up: left out
        let z = batch("z", fixed(10), ScopeKind::Products, &["p1"], false);
        let q = quote(
            &c,
            &[
                offer("a.0.1", &a),
                offer("b.0.1", &b),
                offer("all.0.1", &all),
                offer("z.0.1", &z),
            ],
            NOW,
        );
        assert_eq!(q.best.discount, 1050);
        assert!(q.best.coupons.iter().all(|a| a.discount > 0));
    }

    /// The greedy split in the fixed order can strand a coupon (a broad coupon took the line
    /// a narrower one needed); the augmentation finds the maximum anyway.
    #[test]
    fn the_allocation_reaches_the_maximum_where_the_greedy_split_does_not() {
        // p1 in category c1 and merchant m1; p2 in c1 only; p3 in m1 only.
        let c = cart(vec![
            item("p1", "c1", "m1", 100, 1),
            item("p2", "c1", "m2", 100, 1),
            item("p3", "c2", "m1", 100, 1),
        ]);
        // Categories first: c1 (100) is split 50 + 50 over p1 and p2; then merchant m1 (200)
        // finds 50 + 100 left of p1 and p3: the greedy split gives 250. The maximum is 300:
        // c1 on p2 alone, m1 on p1 and p3.
        let cat = batch("cat", fixed(100), ScopeKind::Categories, &["c1"], false);
        let mer = batch("mer", fixed(200), ScopeKind::Merchants, &["m1"], false);
        let q = quote(&c, &[offer("cat.0.1", &cat), offer("mer.0.1", &mer)], NOW);
        assert_eq!(q.best.discount, 300);
        let per: Vec<(String, i64)> = q
            .best
            .coupons
            .iter()
            .map(|a| (a.coupon_id.clone(), a.discount))
            .collect();
        assert_eq!(per, vec![("cat.0.1".into(), 100), ("mer.0.1".into(), 200)]);
        let shares: Vec<i64> = q.best.lines.iter().map(|l| l.discount).collect();
        assert_eq!(shares, vec![100, 100, 100]);
    }

    // ---- properties, against brute force ----

    struct Spec {
        items: Vec<Item>,
        batches: Vec<Batch>,
        offers: Vec<Offer>,
    }

    fn random_spec(rng: &mut StdRng, max_offers: usize) -> Spec {
        let n = rng.random_range(1..=5);
        let items: Vec<Item> = (0..n)
            .map(|_| {
                item(
                    &format!("p{}", rng.random_range(0..4)),
                    &format!("c{}", rng.random_range(0..3)),
                    &format!("m{}", rng.random_range(0..3)),
                    rng.random_range(0..60),
                    rng.random_range(1..4),
                )
            })
            .collect();
        let nb = rng.random_range(1..=max_offers);
        let batches: Vec<Batch> = (0..nb)
            .map(|i| {
                let d = match rng.random_range(0..3) {
                    0 => thr(rng.random_range(0..200), rng.random_range(1..120)),
                    1 => fixed(rng.random_range(1..120)),
                    _ => pct(
                        rng.random_range(1..=100),
                        rng.random_bool(0.5).then(|| rng.random_range(1..100)),
                    ),
                };
                let (kind, prefix, max) = match rng.random_range(0..4) {
                    0 => (ScopeKind::All, "", 0),
                    1 => (ScopeKind::Products, "p", 4),
                    2 => (ScopeKind::Categories, "c", 3),
                    _ => (ScopeKind::Merchants, "m", 3),
                };
                let ids: Vec<String> = (0..max)
                    .filter(|_| rng.random_bool(0.5))
                    .map(|j| format!("{prefix}{j}"))
                    .collect();
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                batch(&format!("b{i}"), d, kind, &ids, rng.random_bool(0.25))
            })
            .collect();
        let no = rng.random_range(1..=max_offers);
        let offers = (0..no)
            .map(|i| {
                let b = &batches[rng.random_range(0..batches.len())];
                let mut o = offer(&format!("{}.0.{i}", b.id), b);
                if rng.random_bool(0.1) {
                    o.state = Held::Locked;
                }
                o
            })
            .collect();
        Spec {
            items,
            batches,
            offers,
        }
    }

    /// In-scope lines of a batch, computed here independently of `Terms::applies`.
    fn scope_of(b: &Batch, items: &[Item]) -> Vec<usize> {
        (0..items.len())
            .filter(|&i| {
                let it = &items[i];
                let key = match b.scope.kind {
                    ScopeKind::All => return true,
                    ScopeKind::Products => Some(&it.product_id),
                    ScopeKind::Categories => it.category_id.as_ref(),
                    ScopeKind::Merchants => it.merchant_id.as_ref(),
                };
                key.is_some_and(|k| b.scope.ids.contains(k))
            })
            .collect()
    }

    /// A stack's value by the min-cut formula: min over subsets X of the coupons of
    /// (nominals outside X) + (amount of the lines some coupon of X reaches).
    fn stack_value(stack: &[(i64, Vec<usize>)], amounts: &[i64]) -> i64 {
        let k = stack.len();
        (0..1u32 << k)
            .map(|x| {
                let mut reach = vec![false; amounts.len()];
                let mut v = 0;
                for (i, (nom, lines)) in stack.iter().enumerate() {
                    if x & (1 << i) != 0 {
                        lines.iter().for_each(|&l| reach[l] = true);
                    } else {
                        v += nom;
                    }
                }
                v + amounts
                    .iter()
                    .zip(&reach)
                    .filter(|(_, r)| **r)
                    .map(|(a, _)| a)
                    .sum::<i64>()
            })
            .min()
            .unwrap_or(0)
    }

    #[test]
    fn property_best_is_optimal_bounded_and_adds_up() {
        let mut rng = StdRng::seed_from_u64(20_261_111);
        for round in 0..4000 {
            let spec = random_spec(&mut rng, 7);
            let c = cart(spec.items.clone());
            let q = quote(&c, &spec.offers, NOW);
            let ctx = format!("round {round}: {:?} {:?}", spec.items, q);
            let best = &q.best;
            // adds up, per line and per coupon; no line beyond its amount
            assert_eq!(
                best.lines.iter().map(|l| l.discount).sum::<i64>(),
                best.discount,
                "{ctx}"
            );
            assert_eq!(
                best.coupons.iter().map(|a| a.discount).sum::<i64>(),
                best.discount,
                "{ctx}"
            );
            for a in &best.coupons {
                assert_eq!(
                    a.lines.iter().map(|p| p.discount).sum::<i64>(),
                    a.discount,
                    "{ctx}"
                );
                let b = spec.batches.iter().find(|b| b.id == a.batch_id).unwrap();
                let scope = scope_of(b, &spec.items);
                assert!(
                    a.lines.iter().all(|p| scope.contains(&p.line)),
                    "{ctx}: part out of scope"
                );
                let nominal = q
                    .usable
                    .iter()
                    .find(|u| u.coupon_id == a.coupon_id)
                    .unwrap()
                    .discount;
                assert!(a.discount <= nominal, "{ctx}: coupon beyond its nominal");
            }
            for l in &best.lines {
                assert!(0 <= l.discount && l.discount <= l.amount, "{ctx}");
            }
            assert!(best.discount <= c.total(), "{ctx}");
            // never worse than any single usable coupon
            for u in &q.usable {
                assert!(
                    best.discount >= u.discount,
                    "{ctx}: worse than {}",
                    u.coupon_id
                );
            }
            // a legal combination: one exclusive alone, or stackables of distinct batches
            let chosen: Vec<&Usable> = best
                .coupon_ids
                .iter()
                .map(|id| q.usable.iter().find(|u| &u.coupon_id == id).unwrap())
                .collect();
            if chosen.iter().any(|u| u.exclusive) {
                assert_eq!(chosen.len(), 1, "{ctx}");
            }
            let batches: HashSet<&str> = chosen.iter().map(|u| u.batch_id.as_str()).collect();
            assert_eq!(batches.len(), chosen.len(), "{ctx}: two of one batch");
            // optimal: brute force over every legal combination of the usable coupons
            let usable: Vec<(&Usable, Vec<usize>)> = q
                .usable
                .iter()
                .map(|u| {
                    let b = spec.batches.iter().find(|b| b.id == u.batch_id).unwrap();
                    (u, scope_of(b, &spec.items))
                })
                .collect();
            let mut brute = 0;
            for mask in 0..1u32 << usable.len() {
                let pick: Vec<&(&Usable, Vec<usize>)> = usable
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, u)| u)
                    .collect();
                let value = if pick.len() == 1 && pick[0].0.exclusive {
                    pick[0].0.discount
                } else if pick.iter().any(|(u, _)| u.exclusive) {
                    continue;
                } else {
                    let ids: HashSet<&str> =
                        pick.iter().map(|(u, _)| u.batch_id.as_str()).collect();
                    if ids.len() != pick.len() {
                        continue;
                    }
                    let stack: Vec<(i64, Vec<usize>)> =
                        pick.iter().map(|(u, l)| (u.discount, l.clone())).collect();
                    stack_value(&stack, c.amounts())
                };
                brute = brute.max(value);
            }
            assert_eq!(best.discount, brute, "{ctx}: not optimal");
        }
    }

    /// Bounded: a cart of 100 lines and a wallet of 500 coupons of distinct batches with
    /// overlapping scopes quotes quickly (one flow, no subset search).
    #[test]
    fn a_large_wallet_quotes_in_bounded_time() {
        let mut rng = StdRng::seed_from_u64(3);
        let items: Vec<Item> = (0..100)
            .map(|i| {
                item(
                    &format!("p{i}"),
                    &format!("c{}", i % 7),
                    &format!("m{}", i % 5),
                    rng.random_range(100..10_000),
                    rng.random_range(1..5),
                )
            })
            .collect();
        let c = cart(items);
        let mut offers = Vec::new();
        for i in 0..500 {
            let kind = [
                ScopeKind::All,
                ScopeKind::Products,
                ScopeKind::Categories,
                ScopeKind::Merchants,
            ][i % 4];
            let ids: Vec<String> = match kind {
                ScopeKind::All => vec![],
                ScopeKind::Products => (0..10).map(|j| format!("p{}", (i + j * 7) % 100)).collect(),
                ScopeKind::Categories => vec![format!("c{}", i % 7)],
                ScopeKind::Merchants => vec![format!("m{}", i % 5)],
            };
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let b = batch(
                &format!("b{i}"),
                fixed(rng.random_range(100..5_000)),
                kind,
                &ids,
                false,
            );
            offers.push(offer(&format!("b{i}.0.1"), &b));
        }
        let started = std::time::Instant::now();
        let q = quote(&c, &offers, NOW);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            q.best.lines.iter().map(|l| l.discount).sum::<i64>(),
            q.best.discount
        );
        assert!(q.best.discount <= c.total());
    }
}
