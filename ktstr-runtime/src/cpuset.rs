//! A set of CPU numbers, of any size: guests have at most 64 CPUs, but
//! `host_only` tests and host-mode `.run` files run on whatever the host has.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bit `c % 64` of word `c / 64` is CPU `c`. No trailing zero words, so
/// equal sets compare (and hash) equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSet {
    words: Vec<u64>,
}

impl CpuSet {
    pub const fn empty() -> Self {
        CpuSet { words: Vec::new() }
    }
    /// Just CPU `cpu`.
    pub fn one(cpu: u32) -> Self {
        CpuSet::empty().with(cpu)
    }
    /// CPUs `0..n`.
    pub fn first(n: u32) -> Self {
        (0..n).collect()
    }
    pub fn insert(&mut self, cpu: u32) {
        let (w, b) = (cpu as usize / 64, cpu % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << b;
    }
    pub fn with(mut self, cpu: u32) -> Self {
        self.insert(cpu);
        self
    }
    pub fn contains(&self, cpu: u32) -> bool {
        self.words.get(cpu as usize / 64).is_some_and(|w| w & (1 << (cpu % 64)) != 0)
    }
    pub fn is_subset(&self, of: &CpuSet) -> bool {
        self.words.iter().enumerate().all(|(i, w)| w & !of.words.get(i).copied().unwrap_or(0) == 0)
    }
    /// The CPUs in both sets.
    pub fn and(&self, o: &CpuSet) -> CpuSet {
        let mut words: Vec<u64> = self.words.iter().zip(&o.words).map(|(a, b)| a & b).collect();
        while words.last() == Some(&0) {
            words.pop();
        }
        CpuSet { words }
    }
    pub fn len(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
    /// The highest CPU in the set, if any.
    pub fn max(&self) -> Option<u32> {
        let (i, w) = self.words.iter().enumerate().next_back()?;
        Some(i as u32 * 64 + 63 - w.leading_zeros())
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(i, &w)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| i as u32 * 64 + b))
    }
    /// Parses the kernel's list format: `0-3,6,8-9` (empty = no CPUs).
    pub fn parse(s: &str) -> Result<Self, String> {
        // Far beyond any machine's CPU count; keeps a typo from allocating gigabytes.
        const LIMIT: u32 = 1 << 20;
        let mut set = CpuSet::empty();
        for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let num = |x: &str| x.parse::<u32>().map_err(|_| format!("bad CPU list {s:?}"));
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if lo > hi || hi >= LIMIT {
                return Err(format!("bad CPU range {part:?} in {s:?}"));
            }
            (lo..=hi).for_each(|c| set.insert(c));
        }
        Ok(set)
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(cpus: I) -> Self {
        let mut s = CpuSet::empty();
        cpus.into_iter().for_each(|c| s.insert(c));
        s
    }
}

impl std::fmt::Display for CpuSet {
    /// The kernel's list format, e.g. `0-2,5`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpus: Vec<u32> = self.iter().collect();
        let mut parts = Vec::new();
        let mut i = 0;
        while i < cpus.len() {
            let mut j = i;
            while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
                j += 1;
            }
            parts.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
            i = j + 1;
        }
        f.write_str(&parts.join(","))
    }
}

/// Serialized in the list format (`"0-3,200"`): readable in JSON reports
/// and independent of the CPU count.
impl Serialize for CpuSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CpuSet::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let s = CpuSet::parse("0-2,5,7-8\n").unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 1, 2, 5, 7, 8]);
        assert_eq!(s.to_string(), "0-2,5,7-8");
        assert_eq!(CpuSet::parse("").unwrap(), CpuSet::empty());
        assert_eq!(CpuSet::first(4).to_string(), "0-3");
        assert!(CpuSet::parse("3-1").is_err());
        assert!(CpuSet::parse("0-1").unwrap().is_subset(&CpuSet::first(2)));
        assert!(!CpuSet::parse("2").unwrap().is_subset(&CpuSet::first(2)));
    }

    #[test]
    fn beyond_64_cpus() {
        let s = CpuSet::parse("0-1,63-65,200").unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 1, 63, 64, 65, 200]);
        assert_eq!(s.len(), 6);
        assert!(s.contains(200) && s.contains(64) && !s.contains(199) && !s.contains(1000));
        assert_eq!(s.max(), Some(200));
        assert_eq!(s.to_string(), "0-1,63-65,200");
        assert_eq!(CpuSet::first(130).len(), 130);
        assert_eq!(CpuSet::first(130).to_string(), "0-129");
        assert!(CpuSet::one(200).is_subset(&CpuSet::first(201)));
        assert!(!CpuSet::one(200).is_subset(&CpuSet::first(200)));
        assert_eq!(CpuSet::one(70).iter().collect::<Vec<_>>(), [70]);
        assert!(CpuSet::first(2).is_subset(&s));
        assert_eq!(s.and(&CpuSet::parse("1-64").unwrap()).to_string(), "1,63-64");
        assert_eq!(s.and(&CpuSet::parse("300").unwrap()), CpuSet::empty(), "no trailing zero words");
        assert_eq!(CpuSet::empty().with(3).with(200), CpuSet::parse("3,200").unwrap());
        assert!(CpuSet::parse("0-99999999").is_err(), "absurd ranges are refused");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"0-1,63-65,200\"");
        assert_eq!(serde_json::from_str::<CpuSet>(&json).unwrap(), s);
    }
}
