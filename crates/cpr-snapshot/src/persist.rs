// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Save and restore of one component, in the shape Firecracker's `Persist` gave the
//! rust-vmm family.

/// A component (a device, guest memory, a vCPU) whose state is saved in a snapshot and
/// which is built again from it.
///
/// `save` describes the running component as a plain [`State`](crate::State) value (a
/// [`Section`](crate::Section) to write on its own, or a type nested in one);
/// `restore` builds the component again from that value and whatever the new process must
/// supply that a state does not hold: fds, guest memory, an interrupt line, options.
/// Those are the `ConstructorArgs`, borrowed for `'a` when they are the caller's.
///
/// ```
/// use cpr_snapshot::{Persist, State};
///
/// #[derive(Clone, Debug, PartialEq, State)]
/// struct CounterState {
///     value: u64,
/// }
///
/// struct Counter {
///     value: u64,
///     step: u64, // configuration: comes from the command line, not from the state
/// }
///
/// impl Persist<'_> for Counter {
///     type State = CounterState;
///     type ConstructorArgs = u64;
///     type Error = std::convert::Infallible;
///
///     fn save(&self) -> CounterState {
///         CounterState { value: self.value }
///     }
///
///     fn restore(step: u64, state: &CounterState) -> Result<Self, Self::Error> {
///         Ok(Counter { value: state.value, step })
///     }
/// }
///
/// let c = Counter { value: 41, step: 1 };
/// let again = Counter::restore(c.step, &c.save()).unwrap();
/// assert_eq!(again.value + again.step, 42);
/// ```
pub trait Persist<'a>: Sized {
    /// The saved form.
    type State: crate::State;
    /// What `restore` needs besides the state.
    type ConstructorArgs;
    /// Why `restore` failed. A restore checks the state against its arguments (sizes,
    /// counts, identities) and fails rather than build a component on a state that does
    /// not fit it.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The component's state now (call it with the component quiescent: vCPUs paused,
    /// device workers parked).
    fn save(&self) -> Self::State;

    /// Builds the component again from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
