//! [`Trainer`]: the backbone, margin head, optimiser and schedule of a run, and one
//! optimisation step on a batch.

use super::ckpt::{
    backbone_bytes, restore_vars, state_bytes, trainable_names, LoadedCheckpoint, TrainState,
    HEAD_WEIGHT,
};
use super::config::TrainConfig;
use super::loader::Batch;
use super::margin::MarginHead;
use super::net::TrainNet;
use super::optim::{Sgd, SgdConfig};
use super::schedule::LrSchedule;
use crate::kernels::gemm::on_pool;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;

/// What one optimisation step produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// Cross-entropy of the batch.
    pub loss: f64,
    /// Fraction of the batch whose nearest class centre is its own.
    pub accuracy: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Model, head, optimiser and schedule of a run.
pub struct Trainer {
    net: TrainNet,
    head: MarginHead,
    backbone_vars: VarMap,
    head_var: Var,
    opt: Sgd,
    schedule: LrSchedule,
    device: Device,
    /// Position of the run.
    pub state: TrainState,
}

impl Trainer {
    /// A freshly initialised run for `num_classes` identities and `steps_per_epoch` batches.
    pub fn new(
        cfg: &TrainConfig,
        num_classes: usize,
        steps_per_epoch: usize,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let backbone_vars = VarMap::new();
        let net = TrainNet::new(
            VarBuilder::from_varmap(&backbone_vars, DType::F32, device),
            &cfg.backbone.net(),
        )?;
        let head_vars = VarMap::new();
        let head = MarginHead::new(
            VarBuilder::from_varmap(&head_vars, DType::F32, device),
            num_classes,
            cfg.backbone.num_features,
            cfg.loss,
            cfg.scale,
            cfg.margin,
        )?;
        let head_var = head_vars
            .data()
            .lock()
            .map_err(|_| anyhow!("variable map lock poisoned"))?
            .get("weight")
            .cloned()
            .ok_or_else(|| anyhow!("head weight variable missing"))?;
        let names = trainable_names(&backbone_vars)?;
        let mut params = Vec::new();
        {
            let data = backbone_vars
                .data()
                .lock()
                .map_err(|_| anyhow!("variable map lock poisoned"))?;
            for name in names {
                let var = data[&name].clone();
                params.push((name, var));
            }
        }
        params.push((HEAD_WEIGHT.to_string(), head_var.clone()));
        let opt = Sgd::new(
            params,
            SgdConfig {
                momentum: cfg.momentum,
                weight_decay: cfg.weight_decay,
                clip_norm: cfg.clip_grad_norm,
            },
        )?;
        let total_steps = cfg.epochs * steps_per_epoch;
        let schedule = LrSchedule {
            base_lr: cfg.peak_lr(),
            warmup_steps: (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize,
            total_steps,
            steps_per_epoch,
            decay: cfg.decay.clone(),
        };
        schedule.validate()?;
        Ok(Self {
            net,
            head,
            backbone_vars,
            head_var,
            opt,
            schedule,
            device: device.clone(),
            state: TrainState {
                epoch: 0,
                next_batch: 0,
                step: 0,
                lr: 0.0,
                num_classes,
                best: None,
                history: Vec::new(),
            },
        })
    }

    /// Continues from a checkpoint (weights, momentum buffers, position).
    pub fn restore(&mut self, ck: LoadedCheckpoint) -> Result<()> {
        let dir = ck.dir.display().to_string();
        if ck.state.num_classes != self.state.num_classes {
            bail!(
                "checkpoint {dir} was trained on {} identities, the data has {}",
                ck.state.num_classes,
                self.state.num_classes
            );
        }
        restore_vars(
            &self.backbone_vars,
            &ck.backbone,
            &format!("{dir}/backbone.safetensors"),
        )?;
        if ck.head.dims() != self.head_var.dims() {
            bail!(
                "{dir}/state.safetensors: `{HEAD_WEIGHT}` has shape {:?}, the head needs {:?}",
                ck.head.dims(),
                self.head_var.dims()
            );
        }
        self.head_var.set(&ck.head.to_device(&self.device)?)?;
        self.opt.set_buffers(ck.momentum)?;
        self.state = ck.state;
        Ok(())
    }

    /// One forward/backward/SGD step on `batch` at the schedule's current learning rate, on
    /// a rayon worker whose kernels use every thread ([`on_pool`]).
    pub fn step(&mut self, batch: &Batch) -> Result<StepOutput> {
        on_pool(|| self.step_on_this_thread(batch))
    }

    fn step_on_this_thread(&mut self, batch: &Batch) -> Result<StepOutput> {
        let x = batch.tensor(self.net.config().input_size, &self.device)?;
        let emb = self.net.forward_t(&x, true)?;
        let out = self.head.forward(&emb, &batch.labels)?;
        let loss = out.loss.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            bail!(
                "loss is {loss} at step {}: training diverged (lower the learning rate)",
                self.state.step
            );
        }
        let grads = out.loss.backward()?;
        let lr = self.schedule.lr_at(self.state.step);
        let info = self.opt.step(&grads, lr)?;
        self.state.step += 1;
        self.state.next_batch = batch.index + 1;
        self.state.lr = lr;
        Ok(StepOutput {
            loss,
            accuracy: out.accuracy,
            lr,
            grad_norm: info.grad_norm,
        })
    }

    /// The backbone (evaluate it with `forward_t(x, false)`).
    pub fn net(&self) -> &TrainNet {
        &self.net
    }

    /// The backbone variables (arcface_torch names).
    pub fn backbone_vars(&self) -> &VarMap {
        &self.backbone_vars
    }

    /// The device the run is on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Total optimiser steps of the run.
    pub fn total_steps(&self) -> usize {
        self.schedule.total_steps
    }

    /// Serialised `backbone.safetensors`.
    pub fn backbone_file(&self) -> Result<Vec<u8>> {
        backbone_bytes(&self.backbone_vars, self.state.step)
    }

    /// Serialised `state.safetensors`.
    pub fn state_file(&self) -> Result<Vec<u8>> {
        state_bytes(self.head_var.as_tensor(), &self.opt, &self.state)
    }

    /// Trainable variables by name (backbone names and `head.weight`).
    pub fn trainable(&self) -> HashMap<String, Var> {
        self.opt.params().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::BackboneSpec;
    use crate::train::margin::LossKind;

    fn tiny_config() -> TrainConfig {
        let mut cfg = TrainConfig::new("unused", "unused").with_loss(LossKind::ArcFace);
        cfg.backbone = BackboneSpec {
            layers: vec![1, 1, 1, 1],
            num_features: 16,
            dropout: 0.4,
            width: 8,
            input_size: 32,
        };
        cfg.batch_size = 4;
        cfg
    }

    fn batch(n: usize, size: usize, classes: u32) -> Batch {
        let pixels = Tensor::randn(0f32, 0.5, n * 3 * size * size, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        Batch {
            index: 0,
            pixels,
            labels: (0..n as u32).map(|i| i % classes).collect(),
        }
    }

    use candle_core::Tensor;

    #[test]
    fn every_trainable_variable_gets_a_gradient() {
        let cfg = tiny_config();
        let t = Trainer::new(&cfg, 3, 10, &Device::Cpu).unwrap();
        let b = batch(4, 32, 3);
        let x = b.tensor(32, &Device::Cpu).unwrap();
        let emb = t.net.forward_t(&x, true).unwrap();
        let out = t.head.forward(&emb, &b.labels).unwrap();
        let grads = out.loss.backward().unwrap();
        let vars = t.trainable();
        assert!(vars.contains_key(HEAD_WEIGHT));
        assert!(!vars
            .keys()
            .any(|n| n.ends_with("running_mean") || n.ends_with("running_var")));
        let all = t.backbone_vars.data().lock().unwrap().len();
        let stats = t
            .backbone_vars
            .data()
            .lock()
            .unwrap()
            .keys()
            .filter(|n| crate::models::iresnet::is_running_stat(n))
            .count();
        assert_eq!(vars.len(), all - stats + 1);
        let mut missing = Vec::new();
        for (name, var) in &vars {
            let ok = grads.get(var.as_tensor()).is_some_and(|g| {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            });
            if !ok {
                missing.push(name.clone());
            }
        }
        missing.sort();
        assert!(missing.is_empty(), "no gradient for {missing:?}");
    }

    #[test]
    fn steps_reduce_the_loss_on_a_fixed_batch() {
        let mut cfg = tiny_config();
        cfg.backbone.dropout = 0.0;
        cfg.lr = 0.05;
        cfg.scale_lr = false;
        cfg.warmup_epochs = 0.0;
        cfg.loss = LossKind::CosFace;
        cfg.scale = 16.0;
        cfg.margin = 0.1;
        let mut t = Trainer::new(&cfg, 2, 100, &Device::Cpu).unwrap();
        let b = batch(8, 32, 2);
        let first = t.step(&b).unwrap();
        let mut last = first;
        for _ in 0..15 {
            last = t.step(&b).unwrap();
        }
        assert!(last.loss < first.loss * 0.7, "{first:?} → {last:?}");
        assert_eq!(t.state.step, 16);
        assert_eq!(t.state.next_batch, 1);
    }
}
