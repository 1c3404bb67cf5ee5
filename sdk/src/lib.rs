//! The Sluice guest SDK.
