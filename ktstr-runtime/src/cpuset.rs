//! A set of CPU numbers (ktstr guests have at most 64 CPUs).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuSet(pub u64);

impl CpuSet {
    pub const fn empty() -> Self {
        CpuSet(0)
    }
    /// CPUs `0..n`.
    pub fn first(n: u32) -> Self {
        CpuSet(if n >= 64 { u64::MAX } else { (1u64 << n) - 1 })
    }
    pub fn insert(&mut self, cpu: u32) {
        if cpu < 64 {
            self.0 |= 1 << cpu;
        }
    }
    pub fn with(mut self, cpu: u32) -> Self {
        self.insert(cpu);
        self
    }
    pub fn contains(&self, cpu: u32) -> bool {
        cpu < 64 && self.0 & (1 << cpu) != 0
    }
    pub fn is_subset(&self, of: &CpuSet) -> bool {
        self.0 & !of.0 == 0
    }
    pub fn len(&self) -> u32 {
        self.0.count_ones()
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..64).filter(|c| self.contains(*c))
    }
    /// Parses the kernel's list format: `0-3,6,8-9` (empty = no CPUs).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut set = CpuSet::empty();
        for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let num = |x: &str| x.parse::<u32>().map_err(|_| format!("bad CPU list {s:?}"));
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if lo > hi || hi >= 64 {
                return Err(format!("bad CPU range {part:?} in {s:?}"));
            }
            (lo..=hi).for_each(|c| set.insert(c));
        }
        Ok(set)
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
        assert!(CpuSet::parse("64").is_err());
        assert!(CpuSet::parse("0-1").unwrap().is_subset(&CpuSet::first(2)));
        assert!(!CpuSet::parse("2").unwrap().is_subset(&CpuSet::first(2)));
    }
}
