import numpy as np, collections, sys
R = list(np.load("/work/main/runs/route_exp/records.npy", allow_pickle=True))
H = np.load("/work/main/runs/route_exp/hand.npy"); B64 = np.load("/work/main/runs/route_exp/bbg64.npy"); B96 = np.load("/work/main/runs/route_exp/bbg96.npy")
ADAPTERS = sorted({r["adapter"] for r in R if r["adapter"]})
lab = np.array([r["adapter"] or "none" for r in R]); role = np.array([r["role"] for r in R])
FE = {"hand": H, "bb64": B64, "bb96": B96, "hand+bb64": np.concatenate([H / H.std(0).mean(), B64 / B64.std(0).mean()], 1),
      "pe224": np.stack([r["pe224"] for r in R])}
dev = role == "dev"; ev = (role != "dev") & (lab != "none")
for n, X in FE.items():
    mu, sd = X[dev].mean(0), X[dev].std(0) + 1e-6
    Z = (X - mu) / sd
    for nm, A in (("z", Z), ("zcos", Z / np.linalg.norm(Z, axis=1, keepdims=True))):
        d = ((A[ev][:, None] - A[dev][None]) ** 2).sum(-1)
        nn = lab[dev][d.argmin(1)]
        acc = (nn == lab[ev]).mean()
        # nearest class-centroid
        C = np.stack([A[dev & (lab == a)].mean(0) for a in ADAPTERS])
        cc = np.array(ADAPTERS)[((A[ev][:, None] - C[None]) ** 2).sum(-1).argmin(1)]
        errs = collections.Counter((x, y) for x, y in zip(lab[ev], nn) if x != y)
        print(f"{n:10s} {nm:4s} 1NN {acc:.3f} centroid {(cc == lab[ev]).mean():.3f}", errs.most_common(3))
