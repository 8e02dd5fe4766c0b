//! A customer's meter projections by name, in a vector sorted by name.
//!
//! A customer has a handful of meters. A `BTreeMap` allocates its first leaf with room for 11
//! entries whatever it holds, about 3 KB with a [`MeterState`] each; this holds what is there.
//! At a million customers, in a batch of 50k books and in the book cache, that is most of the
//! memory of the decoded state.

use super::{MeterName, MeterState};

/// Meter projections by name, sorted by name (the order of a `BTreeMap`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeterStates(Vec<(MeterName, MeterState)>);

impl MeterStates {
    /// No meters.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    fn find(&self, name: &MeterName) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.cmp(name))
    }

    /// The projection of `name`, if present.
    pub fn get(&self, name: &MeterName) -> Option<&MeterState> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    /// The projection of `name`, if present, to change.
    pub fn get_mut(&mut self, name: &MeterName) -> Option<&mut MeterState> {
        self.find(name).ok().map(|i| &mut self.0[i].1)
    }

    /// The projection of `name`, a default one inserted when absent.
    pub fn get_or_default(&mut self, name: &MeterName) -> &mut MeterState {
        let i = match self.find(name) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (name.clone(), MeterState::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Sets the projection of `name`, returning the one it replaces.
    pub fn insert(&mut self, name: MeterName, state: MeterState) -> Option<MeterState> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, state)),
            Err(i) => {
                self.0.insert(i, (name, state));
                None
            }
        }
    }

    /// Takes the projection of `name` out.
    pub fn remove(&mut self, name: &MeterName) -> Option<MeterState> {
        self.find(name).ok().map(|i| self.0.remove(i).1)
    }

    /// How many meters have a projection.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no meter has a projection.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many entries the vector has room for (for memory estimates).
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// (name, projection) in name order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&MeterName, &MeterState)> {
        self.0.iter().map(|(n, s)| (n, s))
    }

    /// The names, in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &MeterName> {
        self.0.iter().map(|(n, _)| n)
    }

    /// The projections, in name order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &MeterState> {
        self.0.iter().map(|(_, s)| s)
    }
}

/// The projection of `name`; panics when absent, as a `BTreeMap` does.
impl std::ops::Index<&MeterName> for MeterStates {
    type Output = MeterState;
    fn index(&self, name: &MeterName) -> &MeterState {
        self.get(name).expect("no projection for this meter")
    }
}

/// As a `BTreeMap` collects: sorted by name, the last of equal names kept.
impl FromIterator<(MeterName, MeterState)> for MeterStates {
    fn from_iter<I: IntoIterator<Item = (MeterName, MeterState)>>(iter: I) -> Self {
        let mut v: Vec<(MeterName, MeterState)> = iter.into_iter().collect();
        // Stable: equal names keep their input order. Of a run of equal names the first stays
        // in place and takes the value of each later one before it is dropped: the last wins.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        Self(v)
    }
}

impl<'a> IntoIterator for &'a MeterStates {
    type Item = (&'a MeterName, &'a MeterState);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (MeterName, MeterState)>,
        fn(&'a (MeterName, MeterState)) -> (&'a MeterName, &'a MeterState),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(n, s)| (n, s))
    }
}

impl IntoIterator for MeterStates {
    type Item = (MeterName, MeterState);
    type IntoIter = std::vec::IntoIter<(MeterName, MeterState)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn name(i: u8) -> MeterName {
        MeterName::parse(format!("m{i:03}")).unwrap()
    }

    fn state(v: u64) -> MeterState {
        MeterState {
            version: v,
            ..MeterState::default()
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u64),
        Default(u8, u64),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, any::<u64>()).prop_map(|(n, v)| Op::Insert(n, v)),
            (0u8..12, any::<u64>()).prop_map(|(n, v)| Op::Default(n, v)),
            (0u8..12).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// The same answers as a `BTreeMap` after any sequence of changes.
        #[test]
        fn behaves_as_a_btreemap(
            start in prop::collection::vec((0u8..12, any::<u64>()), 0..8),
            ops in prop::collection::vec(op(), 0..40),
        ) {
            let mut ours: MeterStates = start.iter().map(|&(n, v)| (name(n), state(v))).collect();
            let mut model: BTreeMap<MeterName, MeterState> =
                start.iter().map(|&(n, v)| (name(n), state(v))).collect();
            for op in ops {
                match op {
                    Op::Insert(n, v) => {
                        prop_assert_eq!(ours.insert(name(n), state(v)), model.insert(name(n), state(v)));
                    }
                    Op::Default(n, v) => {
                        ours.get_or_default(&name(n)).version += v % 7;
                        model.entry(name(n)).or_default().version += v % 7;
                    }
                    Op::Remove(n) => prop_assert_eq!(ours.remove(&name(n)), model.remove(&name(n))),
                }
                prop_assert_eq!(ours.len(), model.len());
                prop_assert!(ours.iter().eq(model.iter()));
                for n in 0..12 {
                    prop_assert_eq!(ours.get(&name(n)), model.get(&name(n)));
                }
            }
        }
    }
}
