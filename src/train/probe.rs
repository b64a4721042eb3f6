#[cfg(test)]
mod tests {
    use crate::train::margin::*;
    use crate::train::net::*;
    use crate::train::fused::*;
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};
    use std::time::Instant;

    fn t<T>(name: &str, f: impl Fn() -> T) -> T {
        let s = Instant::now();
        let r = f();
        eprintln!("{name}: {:?}", s.elapsed());
        r
    }

    fn run(layers: Vec<usize>, nf: usize, width: usize, size: usize, b: usize) {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = NetConfig { layers: layers.clone(), num_features: nf, dropout: 0.0, width, input_size: size };
        let m = TrainNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
        let hv = VarMap::new();
        let h = MarginHead::new(VarBuilder::from_varmap(&hv, DType::F32, &dev), 100, nf, LossKind::CosFace, 64., 0.35).unwrap();
        let x = Tensor::randn(0f32, 1., (b, 3, size, size), &dev).unwrap();
        let labels: Vec<u32> = (0..b as u32).map(|i| i % 100).collect();
        for it in 0..2 {
            let t = Instant::now();
            let e = m.forward_t(&x, true).unwrap();
            let tf = t.elapsed();
            let o = h.forward(&e, &labels).unwrap();
            let g = o.loss.backward().unwrap();
            let tb = t.elapsed();
            drop(g);
            let t2 = Instant::now();
            let _ = m.forward_t(&x, false).unwrap();
            let ti = t2.elapsed();
            eprintln!("{layers:?} w{width} s{size} b={b} it{it}: fwd {tf:?} fwd+bwd {tb:?} ({:.1} img/s) infer {ti:?} ({:.1} img/s)", b as f64 / tb.as_secs_f64(), b as f64/ti.as_secs_f64());
        }
    }

    #[test]
    #[ignore]
    fn probe() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (32, 64, 112, 112), &dev).unwrap()).unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let bn = TrainBatchNorm::new(64, 1e-5, vb.pp("bn")).unwrap();
        let pr = TrainPrelu::new(64, vb.pp("pr")).unwrap();
        let b = t("bn train fwd", || bn.forward_t(x.as_tensor(), true).unwrap());
        let _ = t("bn bwd", || b.sum_all().unwrap().backward().unwrap());
        let p = t("prelu fwd", || pr.forward(x.as_tensor()).unwrap());
        let _ = t("prelu bwd", || p.sum_all().unwrap().backward().unwrap());
        run(vec![1,1,1,1], 64, 16, 64, 64);
        run(vec![1,1,1,1], 64, 64, 112, 32);
        run(vec![2,2,2,2], 512, 64, 112, 32);
    }
}
