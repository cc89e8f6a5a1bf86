//! The census: where a batch's stock is, and the ONE conservation check.
//!
//! `total == pool + Σ shard stock + in flight + Σ claimed`, where a transfer is in flight
//! from the moment its outbox entry exists in the source until its destination is credited.
//! An outbox entry naming a slot the batch does not have counts as in flight: the stock
//! left its source and no slot can have been credited with it (the sweeper cannot finish
//! such a transfer and reports it, see [`super::transfer`]).
//!
//! Invariant kept here: the API's stock view, the stock gauges, the tests and `reconcile`
//! all read the equation through [`read`] or [`settled`]; nothing else computes it.

use crate::backend::Backend;
use crate::contract::keys::BatchKeys;
use crate::contract::probe::Probe;
use crate::contract::{inbox_check, meta_get, probe};

use super::{Stock, StockError};

/// The conservation equation of a batch at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conservation {
    pub total: i64,
    pub pool: i64,
    pub shards: i64,
    pub in_flight: i64,
    pub claimed: i64,
}

impl Conservation {
    /// The equation holds, and no slot holds negative stock or claimed past the total.
    pub fn holds(&self) -> bool {
        self.pool + self.shards + self.in_flight + self.claimed == self.total
            && self.pool >= 0
            && self.shards >= 0
            && self.claimed <= self.total
    }

    /// Stock accounted for minus the total (0 when the equation holds).
    pub fn off_by(&self) -> i64 {
        self.pool + self.shards + self.in_flight + self.claimed - self.total
    }
}

/// Every slot of the batch, pool first.
pub async fn probe_all<B: Backend>(
    backend: &B,
    keys: &BatchKeys,
) -> Result<Vec<Probe>, StockError> {
    let mut out = Vec::with_capacity(keys.shards.len() + 1);
    for slot in keys.all() {
        out.push(probe::call(backend, slot).await?);
    }
    Ok(out)
}

/// The batch's total stock, from the pool's metadata.
async fn total<B: Backend>(backend: &B, keys: &BatchKeys) -> Result<Option<i64>, StockError> {
    Ok(meta_get::call(backend, &keys.pool).await?.total())
}

/// Stock of the outboxes in `probes` (pool first) not yet credited at its destination.
async fn in_flight<B: Backend>(
    backend: &B,
    keys: &BatchKeys,
    probes: &[Probe],
) -> Result<i64, StockError> {
    let mut sum = 0;
    for p in probes {
        for e in &p.outbox {
            let credited = match keys.slot(e.destination) {
                Some(dst) => inbox_check::call(backend, dst, &e.transfer_id).await?,
                None => false, // a slot the batch does not have was never credited
            };
            if !credited {
                sum += e.amount;
            }
        }
    }
    Ok(sum)
}

fn equation(total: i64, probes: &[Probe], in_flight: i64) -> Conservation {
    Conservation {
        total,
        pool: probes[0].stock,
        shards: probes[1..].iter().map(|p| p.stock).sum(),
        in_flight,
        claimed: probes.iter().map(|p| p.claimed).sum(),
    }
}

/// The equation, read slot by slot in one pass: exact when no claim or transfer runs
/// meanwhile (tests call it after the load; the API shows it as the batch's stock).
pub async fn read<B: Backend>(backend: &B, keys: &BatchKeys) -> Result<Conservation, StockError> {
    let probes = probe_all(backend, keys).await?;
    let total = total(backend, keys).await?.ok_or(StockError::NotFound)?;
    let in_flight = in_flight(backend, keys, &probes).await?;
    Ok(equation(total, &probes, in_flight))
}

/// The equation on a consistent snapshot, for checking it while the batch is live: every
/// slot's transfer sequence and the total are read before and after, and must not move in
/// between (claims do not bump the sequence, but move stock to claimed within one slot,
/// which a probe reads atomically). `None` when stock kept moving for `attempts` tries.
pub async fn settled<B: Backend>(
    backend: &B,
    keys: &BatchKeys,
    attempts: usize,
) -> Result<Option<Conservation>, StockError> {
    for _ in 0..attempts {
        let total_before = total(backend, keys).await?;
        let first = probe_all(backend, keys).await?;
        let in_flight = in_flight(backend, keys, &first).await?;
        let mut stable = true;
        for (slot, p) in keys.all().zip(&first) {
            if probe::call(backend, slot).await?.xseq != p.xseq {
                stable = false;
                break;
            }
        }
        let total_after = total(backend, keys).await?;
        if !stable || total_before != total_after {
            continue;
        }
        let total = total_after.ok_or(StockError::NotFound)?;
        return Ok(Some(equation(total, &first, in_flight)));
    }
    Ok(None)
}

impl<B: Backend> Stock<B> {
    /// [`read`] on this stock's backend.
    pub async fn conservation(&self, keys: &BatchKeys) -> Result<Conservation, StockError> {
        read(self.backend.as_ref(), keys).await
    }

    /// Every slot, pool first.
    pub async fn probe_all(&self, keys: &BatchKeys) -> Result<Vec<Probe>, StockError> {
        probe_all(self.backend.as_ref(), keys).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conservation_arithmetic() {
        let c = Conservation {
            total: 10,
            pool: 3,
            shards: 4,
            in_flight: 1,
            claimed: 2,
        };
        assert!(c.holds());
        assert_eq!(c.off_by(), 0);
        assert!(
            !Conservation {
                claimed: 3,
                ..c.clone()
            }
            .holds()
        );
        assert!(
            !Conservation {
                pool: -1,
                shards: 8,
                ..c
            }
            .holds()
        );
    }
}
