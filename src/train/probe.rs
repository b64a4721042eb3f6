#[cfg(test)]
mod tests {
    use crate::train::conv::conv2d;
    use candle_core::{DType, Device, Tensor, Var, ModuleT, Module};
    use candle_nn::{VarBuilder, VarMap};
    use std::time::Instant;

    fn t<T>(name: &str, f: impl Fn() -> T) -> T {
        let s = Instant::now();
        let r = f();
        eprintln!("{name}: {:?}", s.elapsed());
        r
    }

    #[test]
    #[ignore]
    fn probe() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (32, 64, 112, 112), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (64, 64, 3, 3), &dev).unwrap()).unwrap();
        let y = t("fast conv fwd", || conv2d(x.as_tensor(), w.as_tensor(), 1, 1).unwrap());
        let _ = t("candle conv fwd", || x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap());
        let _ = t("fast conv fwd+bwd", || y.sum_all().unwrap().backward().unwrap());
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let bn = candle_nn::batch_norm(64, 1e-5, vb.pp("bn")).unwrap();
        let pr = candle_nn::prelu(Some(64), vb.pp("pr")).unwrap();
        let b = t("bn train fwd", || bn.forward_t(x.as_tensor(), true).unwrap());
        let _ = t("bn eval fwd", || bn.forward_t(x.as_tensor(), false).unwrap());
        let _ = t("bn bwd", || b.sum_all().unwrap().backward().unwrap());
        let p = t("prelu fwd", || pr.forward(x.as_tensor()).unwrap());
        let _ = t("prelu bwd", || p.sum_all().unwrap().backward().unwrap());
        let _ = t("add", || (x.as_tensor() + x.as_tensor()).unwrap());
        let _ = t("sqr", || x.as_tensor().sqr().unwrap());
        let _ = t("broadcast mul", || x.as_tensor().broadcast_mul(&Tensor::ones((1, 64, 1, 1), DType::F32, &dev).unwrap()).unwrap());
    }
}
