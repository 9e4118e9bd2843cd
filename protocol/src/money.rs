//! USDC amounts: integer micro-USDC inside, decimal strings at the edges.
//!
//! USDC has six decimals. Amounts are parsed and printed with `rust_decimal` and otherwise
//! handled as a whole number of micro-USDC, so no arithmetic ever rounds.

use core::fmt;
use core::str::FromStr;

use rust_decimal::Decimal;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Decimal places of USDC.
pub const DECIMALS: u32 = 6;

const MICROS_PER_USDC: u64 = 1_000_000;

/// A non-negative amount of USDC, as a whole number of micro-USDC (10⁻⁶ USDC).
///
/// Capped at `i64::MAX` micro-USDC so that every amount, and every sum the ledger accepts,
/// fits a signed 64-bit database column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usdc(u64);

/// Why a string is not a valid USDC amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmountError {
    Empty,
    Negative,
    NotADecimal,
    TooManyDecimals,
    TooManyUnitPriceDecimals,
    TooLarge,
}

impl fmt::Display for AmountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmountError::Empty => "amount is empty",
            AmountError::Negative => "amount is negative",
            AmountError::NotADecimal => "amount is not a plain decimal number such as \"0.25\"",
            AmountError::TooManyDecimals => "amount has more than 6 decimals (USDC precision)",
            AmountError::TooManyUnitPriceDecimals => "unit price has more than 12 decimals",
            AmountError::TooLarge => "amount is too large",
        })
    }
}

impl std::error::Error for AmountError {}

impl Usdc {
    pub const ZERO: Usdc = Usdc(0);
    pub const MAX: Usdc = Usdc(i64::MAX as u64);

    /// The amount of `micros` micro-USDC, if it is within range.
    pub const fn from_micros(micros: u64) -> Option<Usdc> {
        if micros <= Self::MAX.0 { Some(Usdc(micros)) } else { None }
    }

    /// The amount of `whole` USDC, if it is within range.
    pub const fn from_whole(whole: u64) -> Option<Usdc> {
        match whole.checked_mul(MICROS_PER_USDC) {
            Some(micros) => Self::from_micros(micros),
            None => None,
        }
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    /// The amount as the signed integer the ledger's databases store (always fits).
    pub const fn micros_i64(self) -> i64 {
        self.0 as i64
    }

    /// The amount of `micros` micro-USDC read back from a signed database column.
    pub fn from_micros_i64(micros: i64) -> Option<Usdc> {
        u64::try_from(micros).ok().and_then(Usdc::from_micros)
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_add(self, other: Usdc) -> Option<Usdc> {
        self.0.checked_add(other.0).and_then(Usdc::from_micros)
    }

    pub fn saturating_sub(self, other: Usdc) -> Usdc {
        Usdc(self.0.saturating_sub(other.0))
    }

    /// `self × count`, if it is within range (the price of `count` calls).
    pub fn checked_mul(self, count: u64) -> Option<Usdc> {
        self.0.checked_mul(count).and_then(Usdc::from_micros)
    }
}

impl FromStr for Usdc {
    type Err = AmountError;

    /// Parses a plain decimal (`"5"`, `"0.25"`, `"0.000001"`): ASCII digits with at most one
    /// dot followed by 1 to 6 digits. No sign, exponent, separator or whitespace.
    fn from_str(s: &str) -> Result<Usdc, AmountError> {
        let micros = parse_fixed(s, DECIMALS, AmountError::TooManyDecimals)?;
        Usdc::from_micros(micros).ok_or(AmountError::TooLarge)
    }
}

/// A plain decimal (digits, at most one dot followed by 1 to `decimals` digits) as an
/// integer count of `10^-decimals` units; more decimals than that is `too_many`.
fn parse_fixed(s: &str, decimals: u32, too_many: AmountError) -> Result<u64, AmountError> {
    if s.is_empty() {
        return Err(AmountError::Empty);
    }
    if s.starts_with('-') {
        return Err(AmountError::Negative);
    }
    let (whole, fraction) = match s.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (s, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !fraction.is_none_or(all_digits) {
        return Err(AmountError::NotADecimal);
    }
    if fraction.is_some_and(|f| f.len() > decimals as usize) {
        return Err(too_many);
    }
    // The grammar above is a strict subset of what rust_decimal accepts; it does the exact
    // conversion (and reports more than 28 significant digits as overflow).
    let mut amount = Decimal::from_str_exact(s).map_err(|_| AmountError::TooLarge)?;
    amount.rescale(decimals);
    if amount.scale() != decimals {
        // rust_decimal could not hold the value at this scale: far beyond our range.
        return Err(AmountError::TooLarge);
    }
    u64::try_from(amount.mantissa()).map_err(|_| AmountError::TooLarge)
}

impl fmt::Display for Usdc {
    /// Always six decimals: `0.001000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `from_micros` caps amounts at i64::MAX, so the cast is lossless.
        fmt::Display::fmt(&Decimal::new(self.0 as i64, DECIMALS), f)
    }
}

impl Serialize for Usdc {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Usdc {
    /// Accepts a decimal string (`"0.25"`) or a whole JSON number of USDC (`5`). Fractional
    /// JSON numbers are refused: they are binary floats and would not be exact.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Usdc, D::Error> {
        struct UsdcVisitor;

        impl Visitor<'_> for UsdcVisitor {
            type Value = Usdc;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a USDC amount as a decimal string such as \"0.25\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Usdc, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Usdc, E> {
                Usdc::from_whole(v).ok_or_else(|| E::custom(AmountError::TooLarge))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Usdc, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(AmountError::Negative)),
                }
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Usdc, E> {
                Err(E::custom(
                    "fractional amounts must be decimal strings such as \"0.25\", not JSON numbers",
                ))
            }
        }

        deserializer.deserialize_any(UsdcVisitor)
    }
}

/// Decimal places a [`UnitPrice`] may have: per-unit prices (an LLM token's, say) are often
/// fractions of a micro-USDC.
pub const UNIT_PRICE_DECIMALS: u32 = 12;

const PICOS_PER_MICRO: u128 = 1_000_000;

/// The price of one unit of a metered route, in pico-USDC (10⁻¹² USDC): up to 12 decimals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitPrice(u64);

impl UnitPrice {
    pub const fn picos(self) -> u64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// What `units` cost, capped at `cap`: `units × price`, rounded up to a whole micro-USDC
    /// once per call (never down: the seller is never paid less than its price; at most
    /// 0.000001 USDC more per call). Exact: the product of two u64 fits a u128.
    pub fn cost(self, units: u64, cap: Usdc) -> Usdc {
        let picos = u128::from(units) * u128::from(self.0);
        let micros = picos.div_ceil(PICOS_PER_MICRO);
        match u64::try_from(micros).ok().and_then(Usdc::from_micros) {
            Some(cost) if cost <= cap => cost,
            _ => cap,
        }
    }
}

impl FromStr for UnitPrice {
    type Err = AmountError;

    /// The grammar of [`Usdc`]'s amounts, with up to 12 decimals.
    fn from_str(s: &str) -> Result<UnitPrice, AmountError> {
        parse_fixed(s, UNIT_PRICE_DECIMALS, AmountError::TooManyUnitPriceDecimals).map(UnitPrice)
    }
}

impl<'de> Deserialize<'de> for UnitPrice {
    /// A decimal string only: per-unit prices are fractions, and JSON numbers would be floats.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<UnitPrice, D::Error> {
        struct UnitPriceVisitor;

        impl Visitor<'_> for UnitPriceVisitor {
            type Value = UnitPrice;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a unit price as a decimal string such as \"0.000002\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<UnitPrice, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(UnitPriceVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usdc(s: &str) -> Usdc {
        s.parse().unwrap()
    }

    #[test]
    fn parses_plain_decimals_exactly() {
        assert_eq!(usdc("0").micros(), 0);
        assert_eq!(usdc("5").micros(), 5_000_000);
        assert_eq!(usdc("0.25").micros(), 250_000);
        assert_eq!(usdc("0.000001").micros(), 1);
        assert_eq!(usdc("1.100000").micros(), 1_100_000);
        assert_eq!(usdc("007.5").micros(), 7_500_000);
    }

    #[test]
    fn prints_six_decimals() {
        assert_eq!(usdc("0.001").to_string(), "0.001000");
        assert_eq!(usdc("5").to_string(), "5.000000");
        assert_eq!(Usdc::ZERO.to_string(), "0.000000");
        assert_eq!(Usdc::MAX.to_string(), "9223372036854.775807");
    }

    #[test]
    fn round_trips_every_printed_amount() {
        for micros in [0, 1, 999_999, 1_000_000, 123_456_789, Usdc::MAX.micros()] {
            let amount = Usdc::from_micros(micros).unwrap();
            assert_eq!(usdc(&amount.to_string()), amount);
        }
    }

    #[test]
    fn rejects_what_is_not_an_exact_non_negative_amount() {
        let cases = [
            ("", AmountError::Empty),
            ("-1", AmountError::Negative),
            ("-0.5", AmountError::Negative),
            ("+1", AmountError::NotADecimal),
            ("1e3", AmountError::NotADecimal),
            ("1_000", AmountError::NotADecimal),
            (" 1", AmountError::NotADecimal),
            ("1.", AmountError::NotADecimal),
            (".5", AmountError::NotADecimal),
            ("1.2.3", AmountError::NotADecimal),
            ("NaN", AmountError::NotADecimal),
            ("٣", AmountError::NotADecimal),
            ("0.0000001", AmountError::TooManyDecimals),
            ("1.1000000", AmountError::TooManyDecimals),
            ("9223372036854.775808", AmountError::TooLarge),
            ("99999999999999999999999999999999", AmountError::TooLarge),
            ("9999999999999999999999999999", AmountError::TooLarge),
            ("9999999999999999999999.999999", AmountError::TooLarge),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<Usdc>(), Err(expected), "input {input:?}");
        }
    }

    #[test]
    fn arithmetic_stays_in_range() {
        assert_eq!(usdc("1").checked_add(usdc("0.5")), Some(usdc("1.5")));
        assert_eq!(Usdc::MAX.checked_add(Usdc::from_micros(1).unwrap()), None);
        assert_eq!(usdc("1").saturating_sub(usdc("2")), Usdc::ZERO);
        assert_eq!(usdc("0.001").checked_mul(37), Some(usdc("0.037")));
        assert_eq!(Usdc::MAX.checked_mul(2), None);
        assert_eq!(Usdc::from_micros(u64::MAX), None);
        assert_eq!(Usdc::from_micros_i64(-1), None);
    }

    #[test]
    fn json_takes_strings_and_whole_numbers_but_not_floats() {
        let parse = |json: &str| serde_json::from_str::<Usdc>(json);
        assert_eq!(parse("\"0.25\"").unwrap(), usdc("0.25"));
        assert_eq!(parse("5").unwrap(), usdc("5"));
        assert!(parse("0.25").unwrap_err().to_string().contains("decimal strings"));
        assert!(parse("-5").unwrap_err().to_string().contains("negative"));
        assert!(parse("\"0.1234567\"").unwrap_err().to_string().contains("more than 6"));
        assert!(parse("18446744073709551615").is_err());
        assert_eq!(serde_json::to_string(&usdc("0.25")).unwrap(), "\"0.250000\"");
    }

    #[test]
    fn unit_prices_take_12_decimals_and_costs_round_up_per_call_to_the_cap() {
        let price = |s: &str| s.parse::<UnitPrice>();
        assert_eq!(price("0.000002").unwrap().picos(), 2_000_000);
        assert_eq!(price("0.00000015").unwrap().picos(), 150_000);
        assert_eq!(price("0.000000000001").unwrap().picos(), 1);
        assert_eq!(price("0.0000000000001"), Err(AmountError::TooManyUnitPriceDecimals));
        assert_eq!(price("-0.1"), Err(AmountError::Negative));
        assert_eq!(price("1e-6"), Err(AmountError::NotADecimal));
        assert_eq!(price("18446744.073709551616"), Err(AmountError::TooLarge));
        let cap = usdc("0.5");
        // 1,234 tokens at 0.000002: exactly 0.002468.
        assert_eq!(price("0.000002").unwrap().cost(1_234, cap), usdc("0.002468"));
        // 1,001 tokens at 0.00000015 is 0.00015015: rounded up to 0.000151.
        assert_eq!(price("0.00000015").unwrap().cost(1_001, cap), usdc("0.000151"));
        // One pico-USDC still costs a micro-USDC; nothing costs nothing.
        assert_eq!(price("0.000000000001").unwrap().cost(1, cap), usdc("0.000001"));
        assert_eq!(price("0.000002").unwrap().cost(0, cap), Usdc::ZERO);
        assert_eq!(price("0.000002").unwrap().cost(250_001, cap), cap);
        assert_eq!(price("18446744.073709551615").unwrap().cost(u64::MAX, Usdc::MAX), Usdc::MAX);
        assert!(serde_json::from_str::<UnitPrice>("0.000002").is_err(), "a float was read");
    }
}
