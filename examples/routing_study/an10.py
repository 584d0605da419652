import sys, numpy as np, torch, torch.nn.functional as F
exec(open("/work/main/runs/route_exp/an9.py").read().split("c = np.load")[0])
from m4oe_adapters.signatures import routing_thumbnails, THUMBNAIL_SIZE
CAST, SAT, AREA = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
def aug2(thumbnails, generator):
    size = THUMBNAIL_SIZE; views = []
    def uniform(a, b): return float(torch.empty(1).uniform_(a, b, generator=generator))
    for image in thumbnails:
        area, aspect = uniform(AREA, 1.0), uniform(0.8, 1.25)
        h = int(min(size, size * (area * aspect) ** 0.5)); w = int(min(size, size * (area / aspect) ** 0.5))
        top = int(torch.randint(0, size - h + 1, (1,), generator=generator)); left = int(torch.randint(0, size - w + 1, (1,), generator=generator))
        v = F.interpolate(image[None, :, top:top + h, left:left + w], size=(size, size), mode="bilinear", align_corners=False)
        if uniform(0, 1) < 0.5: v = v.flip(-1)
        if bool((image[0] != image[1]).any()):
            v = v * torch.empty(1, 3, 1, 1).uniform_(1 - CAST, 1 + CAST, generator=generator)
            g = v.mean(1, keepdim=True); v = g + (v - g) * uniform(1 - SAT, 1 + SAT)
        v = v.clamp(0, 1) ** uniform(0.7, 1.4)
        v = v * uniform(0.8, 1.2) + uniform(-0.1, 0.1)
        if uniform(0, 1) < 0.3: v = F.interpolate(F.avg_pool2d(v, 2), size=(size, size), mode="bilinear", align_corners=False)
        views.append(v[0])
    return routing_thumbnails(torch.stack(views))
augmented_views = aug2
X2, fs2 = build(desc)
evaluate(f"cast{CAST} sat{SAT} lowrank32", lambda: LowRank(32), X2, fs2)
evaluate(f"cast{CAST} sat{SAT} full.2", lambda: Full(0.2), X2, fs2)
m = LowRank(32)
