//! Client API for guest programs (work in progress).
