//! The sections of the campaign tools: the product-page lookup and the admin listing of
//! batches (`[catalog]`), and the checkout quote (`[checkout]`). Each `Default` equals its
//! part of `config/claimgate.toml`; [`super::Config::check`] checks the ranges, naming the
//! key.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// Batches a product page lookup answers at most (ending soonest first).
    pub max_product_batches: usize,
    /// Batches per page of `GET /v1/batches` when `limit` is not given, and the largest
    /// `limit`.
    pub list_default_page: u32,
    pub list_max_page: u32,
    /// Database rows one listing request reads at most while applying its window filters
    /// (a selective filter answers a short page with a cursor rather than a long scan).
    pub list_max_scan: u32,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            max_product_batches: 50,
            list_default_page: 20,
            list_max_page: 100,
            list_max_scan: 1_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckoutConfig {
    /// Cart lines a quote accepts at most (more: 400).
    pub max_items: usize,
    /// Coupons of the user's wallet a quote considers at most (unused first, then locked,
    /// then expired; each by coupon id).
    pub max_coupons: u32,
}

impl Default for CheckoutConfig {
    fn default() -> Self {
        CheckoutConfig {
            max_items: 100,
            max_coupons: 200,
        }
    }
}
