//! Coupon codes for code pools: the look-alike-free alphabet, the check character, the
//! generation spec, and the format of imported partner codes.
//!
//! Invariants kept here:
//! - a generated code is `<prefix><length random symbols><check symbol>`, every symbol of
//!   [`CODE_ALPHABET`], and [`verify`] accepts exactly those: the check symbol (Luhn mod N,
//!   N = 30) catches every single-symbol typo and every adjacent transposition but `2`<->`Z`;
//! - [`generate_unique`] hands out distinct codes only from a space at least 4 times larger
//!   than the request, so guessing or colliding stays rare;
//! - no code, generated ([`CodeSpec::validate`]) or imported ([`valid_code`]), can hold `|`,
//!   `,` or whitespace: the separators of the scripts' record formats.

use std::collections::HashSet;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The symbols of generated codes: digits and uppercase letters without the look-alikes
/// `0 O 1 I L U` (30 symbols; a symbol's value is its index here).
pub const CODE_ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTVWXYZ";

/// N of Luhn mod N.
const N: usize = CODE_ALPHABET.len();

/// The fewest random symbols of a generated code.
pub const MIN_RANDOM_LEN: u32 = 6;
/// The most random symbols of a generated code.
pub const MAX_RANDOM_LEN: u32 = 32;
/// The longest prefix of a generated code.
pub const MAX_PREFIX_LEN: usize = 16;
/// The longest imported code, in bytes.
pub const MAX_CODE_LEN: usize = 64;

/// The value (index in [`CODE_ALPHABET`]) of a symbol, or `None` outside the alphabet.
fn symbol_value(c: u8) -> Option<usize> {
    CODE_ALPHABET.iter().position(|&s| s == c)
}

/// The check character of `body` (the random symbols, without the prefix): Luhn mod N over
/// [`CODE_ALPHABET`]. Appended to the body, it detects every single-symbol substitution and
/// every transposition of two adjacent distinct symbols except `2`<->`Z` (values 0 and N-1,
/// the analogue of Luhn's `09`<->`90`). `None` if `body` holds a character outside the
/// alphabet.
pub fn check_char(body: &str) -> Option<char> {
    let mut sum = 0;
    // From the right, the symbol next to the check symbol is doubled, then every other one.
    for (i, c) in body.bytes().rev().enumerate() {
        let v = symbol_value(c)?;
        let addend = if i % 2 == 0 { 2 * v } else { v };
        sum += addend / N + addend % N;
    }
    Some(char::from(CODE_ALPHABET[(N - sum % N) % N]))
}

/// How a code pool generates its codes (`codes.generate` of a batch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeSpec {
    /// Fixed text in front of every code: 0..=[`MAX_PREFIX_LEN`] characters of `[A-Z0-9-]`.
    #[serde(default)]
    pub prefix: String,
    /// The number of random symbols, without the prefix and the check symbol:
    /// [`MIN_RANDOM_LEN`]..=[`MAX_RANDOM_LEN`].
    pub length: u32,
}

impl CodeSpec {
    /// Checks the prefix and the length; the error is client-facing.
    pub fn validate(&self) -> Result<(), String> {
        if self.prefix.len() > MAX_PREFIX_LEN
            || !self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "codes.generate.prefix must be at most {MAX_PREFIX_LEN} characters of [A-Z0-9-]"
            ));
        }
        if !(MIN_RANDOM_LEN..=MAX_RANDOM_LEN).contains(&self.length) {
            return Err(format!(
                "codes.generate.length must be {MIN_RANDOM_LEN}..={MAX_RANDOM_LEN}"
            ));
        }
        Ok(())
    }

    /// The number of distinct codes of this spec: 30^length.
    pub fn capacity(&self) -> f64 {
        (N as f64).powf(f64::from(self.length))
    }
}

/// A new code: `spec.prefix`, `spec.length` uniformly random symbols of [`CODE_ALPHABET`]
/// and the [`check_char`] of those. `spec` is expected to be valid ([`CodeSpec::validate`]).
pub fn generate(spec: &CodeSpec, rng: &mut impl Rng) -> String {
    let body: String = (0..spec.length)
        .map(|_| char::from(CODE_ALPHABET[rng.random_range(0..N)]))
        .collect();
    let check = check_char(&body).expect("the body is made of alphabet symbols");
    let mut code = String::with_capacity(spec.prefix.len() + body.len() + 1);
    code.push_str(&spec.prefix);
    code.push_str(&body);
    code.push(check);
    code
}

/// Whether `code` is one [`generate`] could have made from `spec`: the prefix, then
/// `spec.length` alphabet symbols, then their check symbol.
pub fn verify(spec: &CodeSpec, code: &str) -> bool {
    let Some(rest) = code.strip_prefix(spec.prefix.as_str()) else {
        return false;
    };
    if rest.len() != spec.length as usize + 1 || !rest.is_ascii() {
        return false;
    }
    let (body, check) = rest.split_at(rest.len() - 1);
    check_char(body).is_some_and(|c| check.starts_with(c))
}

/// `n` distinct codes of `spec`, in generation order. Refused (client-facing error) for an
/// invalid spec, or when `n` exceeds a quarter of [`CodeSpec::capacity`]: in a space that
/// small, collisions and guessed codes stop being rare. The caller bounds `n` (the batch's
/// stock): the codes are held in memory.
pub fn generate_unique(
    spec: &CodeSpec,
    n: usize,
    rng: &mut impl Rng,
) -> Result<Vec<String>, String> {
    spec.validate()?;
    if n as f64 > spec.capacity() / 4.0 {
        return Err(format!(
            "codes.generate.length {} is too short for {n} codes: the space of 30^{} codes \
             must be at least 4 times the count for collisions to stay rare",
            spec.length, spec.length
        ));
    }
    let mut seen = HashSet::new();
    let mut codes = Vec::new();
    while codes.len() < n {
        let code = generate(spec, rng);
        if seen.insert(code.clone()) {
            codes.push(code);
        }
    }
    Ok(codes)
}

/// An imported (partner) code: 1..=[`MAX_CODE_LEN`] bytes of `[A-Za-z0-9._-]`. No `|`, `,`
/// or whitespace: the Lua scripts join codes with `,` and records with `|`.
pub fn valid_code(s: &str) -> bool {
    (1..=MAX_CODE_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const BODIES: &[&str] = &["222222", "ZZZZZZZ", "23456789AB", "K7QX9M2T", "Z2Z2Z2Z2Z2Z"];

    fn spec(prefix: &str, length: u32) -> CodeSpec {
        CodeSpec {
            prefix: prefix.to_owned(),
            length,
        }
    }

    fn with_symbol(code: &str, i: usize, c: u8) -> String {
        let mut b = code.as_bytes().to_vec();
        b[i] = c;
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn check_char_known_values_and_foreign_symbols() {
        assert_eq!(check_char(""), Some('2'));
        assert_eq!(check_char("222222"), Some('2'));
        // One symbol of value 1 ('3'), doubled: 2, so the check is 30 - 2 = 28 ('Y').
        assert_eq!(check_char("3"), Some('Y'));
        for bad in ["ABC0", "O", "1", "I", "L", "U", "abc", "AB-C", "AB C", "ÄB"] {
            assert_eq!(check_char(bad), None, "{bad}");
        }
    }

    #[test]
    fn check_char_detects_every_substitution() {
        for body in BODIES {
            let check = check_char(body).unwrap();
            for i in 0..body.len() {
                for &c in CODE_ALPHABET.iter().filter(|&&c| c != body.as_bytes()[i]) {
                    let typo = with_symbol(body, i, c);
                    assert_ne!(check_char(&typo), Some(check), "{body} -> {typo}");
                }
            }
        }
    }

    #[test]
    fn check_char_detects_adjacent_transpositions_but_2_z() {
        let (mut total, mut missed) = (0u32, 0u32);
        for body in BODIES {
            for i in 0..body.len() - 1 {
                for &a in CODE_ALPHABET {
                    for &b in CODE_ALPHABET.iter().filter(|&&b| b != a) {
                        let ab = with_symbol(&with_symbol(body, i, a), i + 1, b);
                        let ba = with_symbol(&with_symbol(body, i, b), i + 1, a);
                        total += 1;
                        if check_char(&ab) == check_char(&ba) {
                            missed += 1;
                            assert!(matches!((a, b), (b'2', b'Z') | (b'Z', b'2')), "{ab} / {ba}");
                        }
                    }
                }
            }
        }
        let rate = 1.0 - f64::from(missed) / f64::from(total);
        assert!(rate >= 0.95, "transposition detection rate {rate}");
        assert!(missed > 0, "the 2<->Z blind spot is expected");
    }

    #[test]
    fn generate_verify_round_trip() {
        let mut rng = StdRng::seed_from_u64(7);
        for s in [spec("", 6), spec("SUMMER-24", 10), spec("X", 32)] {
            for _ in 0..200 {
                let code = generate(&s, &mut rng);
                assert_eq!(code.len(), s.prefix.len() + s.length as usize + 1);
                assert!(code.starts_with(&s.prefix));
                assert!(
                    code[s.prefix.len()..]
                        .bytes()
                        .all(|b| CODE_ALPHABET.contains(&b))
                );
                assert!(verify(&s, &code), "{code}");
            }
        }
    }

    #[test]
    fn verify_rejects_wrong_prefix_length_and_check() {
        let s = spec("PRE-", 8);
        let code = generate(&s, &mut StdRng::seed_from_u64(1));
        assert!(verify(&s, &code));
        assert!(!verify(&spec("PRX-", 8), &code));
        assert!(!verify(&spec("", 8), &code));
        assert!(!verify(&s, &code[4..]));
        assert!(!verify(&spec("PRE-", 7), &code));
        assert!(!verify(&spec("PRE-", 9), &code));
        assert!(!verify(&s, &code[..code.len() - 1]));
        assert!(!verify(&s, &format!("{code}2")));
        let last = code.len() - 1;
        for &c in CODE_ALPHABET
            .iter()
            .filter(|&&c| c != code.as_bytes()[last])
        {
            assert!(!verify(&s, &with_symbol(&code, last, c)));
        }
        assert!(!verify(&s, &code.to_lowercase()));
        assert!(!verify(&s, &with_symbol(&code, 5, b'0')));
        assert!(!verify(&s, ""));
        // Non-ASCII of the right byte length is refused, not a panic.
        assert!(!verify(&spec("", 6), "2222é2"));
        assert!(!verify(&spec("", 6), "222222é"));
    }

    #[test]
    fn generate_unique_distinct_and_verified() {
        let s = spec("G", 6);
        let codes = generate_unique(&s, 5000, &mut StdRng::seed_from_u64(3)).unwrap();
        assert_eq!(codes.len(), 5000);
        assert_eq!(codes.iter().collect::<HashSet<_>>().len(), 5000);
        assert!(codes.iter().all(|c| verify(&s, c)));
        assert_eq!(
            generate_unique(&s, 0, &mut StdRng::seed_from_u64(3)),
            Ok(vec![])
        );
    }

    #[test]
    fn generate_unique_refuses_a_small_space_or_a_bad_spec() {
        let mut rng = StdRng::seed_from_u64(4);
        let s = spec("", 6);
        let quarter = (s.capacity() / 4.0) as usize; // 30^6 / 4 = 182_250_000
        let err = generate_unique(&s, quarter + 1, &mut rng).unwrap_err();
        assert!(err.contains("length 6"), "{err}");
        assert!(generate_unique(&spec("", 5), 1, &mut rng).is_err());
        assert!(generate_unique(&spec("a", 8), 1, &mut rng).is_err());
    }

    #[test]
    fn spec_validation_edges() {
        assert_eq!(spec("", 6).validate(), Ok(()));
        assert_eq!(spec("", 32).validate(), Ok(()));
        assert_eq!(spec("ABCDEFGHIJKLMN-9", 8).validate(), Ok(()));
        let len_err = Err("codes.generate.length must be 6..=32".to_owned());
        assert_eq!(spec("", 5).validate(), len_err);
        assert_eq!(spec("", 33).validate(), len_err);
        assert_eq!(spec("", 0).validate(), len_err);
        for bad in ["ABCDEFGHIJKLMN-9X", "abc", "A B", "A|B", "A,B", "A_B", "Ä"] {
            let err = spec(bad, 8).validate().unwrap_err();
            assert!(err.starts_with("codes.generate.prefix"), "{bad}: {err}");
        }
        assert_eq!(spec("", 6).capacity(), 729_000_000.0);
    }

    #[test]
    fn spec_serde() {
        let s: CodeSpec = serde_json::from_str(r#"{"length": 8}"#).unwrap();
        assert_eq!(s, spec("", 8));
        let s: CodeSpec = serde_json::from_str(r#"{"prefix": "P-", "length": 8}"#).unwrap();
        assert_eq!(s, spec("P-", 8));
        assert!(serde_json::from_str::<CodeSpec>(r#"{"length": 8, "x": 1}"#).is_err());
        assert!(serde_json::from_str::<CodeSpec>(r#"{"prefix": "P"}"#).is_err());
    }

    #[test]
    fn valid_code_examples() {
        for ok in [
            "a",
            "ABC-123",
            "partner_code.v2",
            "x".repeat(MAX_CODE_LEN).as_str(),
        ] {
            assert!(valid_code(ok), "{ok}");
        }
        let too_long = "x".repeat(MAX_CODE_LEN + 1);
        for bad in [
            "",
            "a|b",
            "a,b",
            "a b",
            "a\tb",
            "a\n",
            "é",
            "a:b",
            "{a}",
            too_long.as_str(),
        ] {
            assert!(!valid_code(bad), "{bad:?}");
        }
    }

    /// Property (a seeded randomized test: `proptest` is not a dependency of this crate):
    /// for a random valid spec, every generated code verifies, and changing any one body or
    /// check symbol to another alphabet symbol makes it fail.
    #[test]
    fn prop_generated_codes_verify_and_any_substitution_fails() {
        const PREFIX_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-";
        let mut meta = StdRng::seed_from_u64(0x00c0_de5e);
        for case in 0..256 {
            let seed: u64 = meta.random();
            let prefix: String = (0..meta.random_range(0..=MAX_PREFIX_LEN))
                .map(|_| char::from(PREFIX_CHARS[meta.random_range(0..PREFIX_CHARS.len())]))
                .collect();
            let s = spec(&prefix, meta.random_range(MIN_RANDOM_LEN..=MAX_RANDOM_LEN));
            assert_eq!(s.validate(), Ok(()));
            let code = generate(&s, &mut StdRng::seed_from_u64(seed));
            assert!(verify(&s, &code), "case {case}: {s:?} seed {seed}: {code}");
            for i in s.prefix.len()..code.len() {
                for &c in CODE_ALPHABET.iter().filter(|&&c| c != code.as_bytes()[i]) {
                    let typo = with_symbol(&code, i, c);
                    assert!(!verify(&s, &typo), "case {case}: {s:?} seed {seed}: {typo}");
                }
            }
        }
    }
}
