//! Layers the towers share where their math is the same. Attention is written once in the
//! kernels' dispatch layer (`blipdex_kernels::Kernels::attention`); the feed-forward block is
//! here.

use blipdex_kernels::Linear;
use candle_core::{Module, Result, Tensor};
use candle_nn::Activation;

/// A linear layer that may fuse the activation that follows it.
pub trait LinearAct: Module {
    /// `act(self(x))`.
    fn forward_act(&self, act: Activation, x: &Tensor) -> Result<Tensor> {
        act.forward(&self.forward(x)?)
    }
}

impl LinearAct for Linear {
    fn forward_act(&self, act: Activation, x: &Tensor) -> Result<Tensor> {
        Linear::forward_act(self, act, x)
    }
}

/// `fc2(act(fc1(x)))`: the ViT's `Blip2MLP` and OPT's feed-forward (`fc1`, `fc2` in both
/// checkpoints).
#[derive(Debug, Clone)]
pub struct Mlp<L> {
    pub fc1: L,
    pub fc2: L,
    pub act: Activation,
}

impl<L: LinearAct> Module for Mlp<L> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward_act(self.act, x)?;
        self.fc2.forward(&h)
    }
}
