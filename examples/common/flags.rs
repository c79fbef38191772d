//! The examples' one helper over `lexopt`: a flag's value parsed as a number, with an error
//! that names the flag and the value. Included by each example with `#[path]` (this folder
//! has no `main.rs`, so cargo builds no example of it).

/// The value of `flag`, a number.
pub(crate) fn number<T>(p: &mut lexopt::Parser, flag: &str) -> Result<T, lexopt::Error>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    use lexopt::ValueExt as _;
    let v = p.value()?.string()?;
    v.parse().map_err(|e| format!("{flag} {v:?}: {e}").into())
}
