"""
Procedural scenes for depth: numpy ray casting of rooms and open ground with spheres, boxes and
textured panels, Lambertian light and shadows, open sky as invalid pixels. Deterministic by seed.

They serve the tests, the CPU demo and the bundled tiny prior, and (through data.write_depth_set) files
in the real data sets' layouts. Variety matters: camera height, pitch, yaw and roll; rooms and open
scenes; object count, size and distance; textures fixed in object coordinates, so colour says nothing
about depth. data.py wraps them as RenderedDepthDataset.

World frame: y up, metres. Camera frame: x right, y down, z forward (image convention).
A pixel (i, j) looks along d = R @ (u, v, 1) with u = (j + 0.5 - W/2) / f, v = (i + 0.5 - H/2) / f
(pixel centres, the same convention as Hypersim's distance -> depth conversion). Because d is NOT
normalised and its camera-frame z component is 1, the ray parameter t of a hit IS its planar depth.
"""
import math

import numpy as np

MAX_RENDER_DEPTH = 80.0   # open scenes: ground farther than this is invalid, as Virtual KITTI's < 80 m
RENDER_MIN_DEPTH = 1e-3   # evaluation range of rendered scenes (see DEPTH_KINDS["rendered"])


def _rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def camera_rotation(yaw, pitch, roll=0.0):
    """Camera-to-world rotation; columns = (right, down, forward) in world coordinates.
    yaw turns about the world y axis (0 looks along +z), pitch > 0 looks up, roll turns about forward."""
    fwd = np.array([math.cos(pitch) * math.sin(yaw), math.sin(pitch), math.cos(pitch) * math.cos(yaw)])
    right = np.cross([0.0, 1.0, 0.0], fwd)
    right /= np.linalg.norm(right)
    down = np.cross(right, fwd)
    c, s = math.cos(roll), math.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, fwd], axis=1)


def camera_rays(height, width, focal, rot):
    """Unnormalised world ray directions (H*W, 3), row-major pixels, whose camera-frame z is 1
    (so the ray parameter t of a hit is its planar depth). render() builds the same rays."""
    v, u = np.meshgrid((np.arange(height) + 0.5 - height / 2) / focal,
                       (np.arange(width) + 0.5 - width / 2) / focal, indexing="ij")
    return (rot[:, 0:1] * u.ravel() + rot[:, 1:2] * v.ravel() + rot[:, 2:3]).T


def _material(rng, yaw=None):
    """A texture defined in the surface's own 3-D frame: it moves with the object, so its colours say
    nothing about depth; apparent texture size shrinks with distance as in real photographs."""
    hsv = np.stack([rng.uniform(0, 1, 4), rng.uniform(0.05, 0.8, 4), rng.uniform(0.25, 0.95, 4)], 1)
    colors = np.array([_hsv_to_rgb(*c) for c in hsv])  # (4, 3) palette
    return dict(pattern=rng.choice(["checker", "tiles", "stripes", "plain"], p=[0.3, 0.3, 0.2, 0.2]),
                colors=colors,
                scale=np.exp(rng.uniform(np.log(0.2), np.log(1.5), 3)),  # cell size per axis, metres
                phase=rng.uniform(0, 1, 3),  # keeps planes off cell boundaries
                rot=_rot_y(rng.uniform(0, 2 * np.pi) if yaw is None else yaw))


def _hsv_to_rgb(h, s, v):
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def random_scene(seed, min_valid=0.25):
    """A random scene description (a plain dict) from a seed; render() turns it into images.

    Two kinds, half each: a closed room (floor, four walls, ceiling, a point light; every pixel
    valid) and an open scene (infinite ground, sky = invalid, ground beyond MAX_RENDER_DEPTH invalid,
    sun light, large boxes as buildings). Camera height, pitch, yaw, roll, field of view, object
    count, size and distance are all random, so depth must be read from the image: the mean training
    depth map is a weak predictor (see test_data.py for the measured baseline).
    Scenes whose valid share would fall below min_valid are redrawn (deterministically). The
    description does not depend on the image size (the focal length is a fraction of the width)."""
    for attempt in range(20):
        rng = np.random.default_rng([seed, attempt])
        scene = _draw_scene(rng)
        if scene["kind"] == "room" or _valid_share(scene) >= min_valid:
            return scene
    return scene


def _valid_share(scene):
    # a cheap 12 x 16 look at how much of the view is valid
    out = render(scene, 12, 16)
    return out["valid"].mean()


def _draw_scene(rng):
    hfov = np.deg2rad(rng.uniform(45, 80))
    focal_frac = 0.5 / math.tan(hfov / 2)  # focal length in units of the image width
    scene = dict(focal_frac=focal_frac, planes=[], spheres=[], boxes=[], quads=[],
                 ambient=rng.uniform(0.1, 0.35), exposure=rng.uniform(0.75, 1.25),
                 light_color=1.0 - rng.uniform(0, 0.25, 3), max_depth=MAX_RENDER_DEPTH)
    # Random, but within what depth can be read from: a near-level camera (roll std 3 deg), pitches that
    # keep floor or horizon in view, texture cells of 0.2 m or more (finer ones alias to noise at 48x64)
    # and objects of their own size resting on the floor. The wider family these replaced (roll std 8 deg,
    # pitch -50..45 / -60..15, cells from 8 cm, foreground objects sized in proportion to their distance
    # and floating half the time) left a plain pixel regressor 12% under the mean depth map and +0.02 in
    # delta1 after 48,000 samples of 2,000 scenes; this one 17% and +0.08 (README, results.py --part ceiling).
    yaw, roll = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.normal(0, 3))
    if rng.random() < 0.5:  # a closed room
        scene["kind"] = "room"
        sx, sz = np.exp(rng.uniform(np.log(2.5), np.log(14), 2))
        ceil = rng.uniform(2.2, 4.5)
        lo, hi = np.zeros(3), np.array([sx, ceil, sz])
        cam = np.array([rng.uniform(0.3, sx - 0.3), rng.uniform(0.3, min(2.6, ceil - 0.3)),
                        rng.uniform(0.3, sz - 0.3)])
        rot = camera_rotation(yaw, np.deg2rad(rng.uniform(-35, 25)), roll)
        # one-sided planes n . p = c with n pointing into the room: floor, ceiling, 4 walls
        for n, c in [((0, 1, 0), 0.0), ((0, -1, 0), -ceil), ((1, 0, 0), 0.0), ((-1, 0, 0), -sx),
                     ((0, 0, 1), 0.0), ((0, 0, -1), -sz)]:
            scene["planes"].append(dict(n=np.array(n, float), c=c, material=_material(rng, 0.0)))
        lamp = np.array([rng.uniform(0.2, sx - 0.2), ceil - 0.15, rng.uniform(0.2, sz - 0.2)])
        scene["light"] = dict(kind="point", pos=lamp,
                              power=rng.uniform(0.6, 1.2), falloff=max(sx, sz, ceil))
        for _ in range(rng.integers(0, 15)):  # furniture anywhere in the room
            size = math.exp(rng.uniform(math.log(0.12), math.log(min(1.3, 0.3 * min(sx, sz)))))
            margin = np.minimum(size, (hi - lo) / 2 - 0.05)
            _add_object(rng, scene, rng.uniform(lo + margin, hi - margin), size, cam, room=(lo, hi))
        near = (0.6, 3.0)
    else:  # open ground under the sky
        scene["kind"] = "open"
        cam = np.array([0.0, math.exp(rng.uniform(math.log(0.4), math.log(10.0))), 0.0])
        rot = camera_rotation(yaw, np.deg2rad(rng.uniform(-40, 10)), roll)
        scene["planes"].append(dict(n=np.array([0.0, 1.0, 0.0]), c=0.0, material=_material(rng)))
        elev, azim = np.deg2rad(rng.uniform(15, 75)), rng.uniform(0, 2 * np.pi)
        to_sun = np.array([math.cos(elev) * math.sin(azim), math.sin(elev), math.cos(elev) * math.cos(azim)])
        scene["light"] = dict(kind="sun", power=1.0, dir=-to_sun)
        scene["sky"] = dict(
            horizon=_hsv_to_rgb(rng.uniform(0.5, 0.7), rng.uniform(0, 0.3), rng.uniform(0.7, 1)),
            zenith=_hsv_to_rgb(rng.uniform(0.55, 0.7), rng.uniform(0.3, 0.8), rng.uniform(0.5, 0.9)))
        scene["fog"] = math.exp(rng.uniform(math.log(60), math.log(400)))  # aerial perspective, metres
        n_obj, n_bld = rng.integers(0, 16), rng.integers(0, 6)
        spread = hfov / 2 + 0.3
        for k in range(n_obj + n_bld):  # objects and buildings around the view direction
            big = k >= n_obj
            dist = math.exp(rng.uniform(math.log(12 if big else 1.0), math.log(70 if big else 45)))
            size = math.exp(rng.uniform(math.log(3 if big else 0.15), math.log(14 if big else 3.5)))
            a = yaw + rng.uniform(-spread, spread)
            c = np.array([cam[0] + dist * math.sin(a), size, cam[2] + dist * math.cos(a)])
            _add_object(rng, scene, c, size, cam, building=big)
        near = (1.0, 12.0)
    # foreground objects at random places in the view, so that "near" is not always "image bottom"
    for _ in range(rng.choice(4, p=[0.3, 0.35, 0.25, 0.1])):
        dist = math.exp(rng.uniform(*np.log(near)))
        where = np.array([rng.uniform(-0.45, 0.45) / focal_frac, rng.uniform(-0.35, 0.35) / focal_frac, 1.0])
        c = cam + dist * rot @ where  # planar distance dist along a ray into the view
        size = math.exp(rng.uniform(math.log(0.3), math.log(1.2)))   # metres, whatever the distance
        if scene["kind"] == "room":
            c = np.clip(c, lo + 0.05, hi - 0.05)
        _add_object(rng, scene, c, size, cam, room=(lo, hi) if scene["kind"] == "room" else None,
                    rest=True)
    scene["camera"] = dict(pos=cam, rot=rot)
    return scene


def _add_object(rng, scene, c, size, cam, room=None, building=False, rest=True):
    """Adds a sphere, box or textured quad of about `size` metres at c (resting on the floor y = 0 when
    rest, or if it would cut the floor), unless it would hold the camera."""
    kind = "box" if building else rng.choice(["sphere", "box", "quad"], p=[0.35, 0.4, 0.25])
    c = np.array(c, float)
    if kind == "sphere":
        r = size / 2
        c[1] = r if rest and rng.random() < 0.7 else max(c[1], r)
        if np.linalg.norm(c - cam) > r + 0.3:
            scene["spheres"].append(dict(c=c, r=r, material=_material(rng)))
    elif kind == "box":
        half = size / 2 * np.exp(rng.uniform(-0.6, 0.6, 3))
        if building:
            half[1] = size * rng.uniform(0.5, 2.0)
        c[1] = half[1] if rest else max(c[1], half[1])
        yaw = rng.uniform(0, np.pi)
        if np.linalg.norm(c - cam) > np.linalg.norm(half) + 0.3:
            scene["boxes"].append(dict(c=c, half=half, yaw=yaw, rot=_rot_y(yaw), material=_material(rng, yaw)))
    else:  # a textured panel: on a room wall (a poster) or free standing at a random angle
        half = size / 2 * np.exp(rng.uniform(-0.5, 0.5, 2))
        c[1] = half[1] + rng.uniform(0, 0.5) if rest else max(c[1], half[1])
        yaw = rng.uniform(0, np.pi)
        if room is not None and rng.random() < 0.5:
            lo, hi = room
            wall = rng.integers(0, 4)  # x = lo, x = hi, z = lo, z = hi; 1 cm in front of the wall
            axis = 0 if wall < 2 else 2
            c[axis] = lo[axis] + 0.01 if wall % 2 == 0 else hi[axis] - 0.01
            yaw = np.pi / 2 if axis == 0 else 0.0
        rot = _rot_y(yaw)
        if np.linalg.norm(c - cam) > np.linalg.norm(half) + 0.3:
            scene["quads"].append(dict(c=c, ax=rot[:, 0], ay=rot[:, 1], half=half, material=_material(rng, yaw)))


# --- intersections, on (3, N) arrays (one row per coordinate: numpy's matmul and reductions over a
# trailing axis of 3 are slow, row-wise arithmetic is fast). o: (3, 1) or (3, N) ray origins,
# d: (3, N) directions. Each returns t (N,), inf on a miss.

def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _mv(m, v):
    """m (3, 3) @ v (3, N), row by row."""
    return np.stack([m[i, 0] * v[0] + m[i, 1] * v[1] + m[i, 2] * v[2] for i in range(3)])


def _hit_plane(o, d, n, c):
    # one-sided: only hits from the side n points to (room planes face inwards, the ground up)
    den = _dot(n, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (c - _dot(n, o)) / den
    return np.where((den < 0) & (t > 1e-6), t, np.inf)


def _hit_sphere(o, d, c, r):
    oc = o - c[:, None]
    a, b, cc = _dot(d, d), 2 * _dot(d, oc), _dot(oc, oc) - r * r
    disc = b * b - 4 * a * cc
    sq = np.sqrt(np.maximum(disc, 0))
    t0, t1 = (-b - sq) / (2 * a), (-b + sq) / (2 * a)
    t = np.where(t0 > 1e-6, t0, t1)  # origin outside: t0; on a shadow ray from inside: t1 (unused)
    return np.where((disc >= 0) & (t > 1e-6), t, np.inf)


def _hit_box(o, d, c, half, rot):
    """Slab test in the box frame (rot: box -> world). Returns t and the entry face's axis (0, 1, 2)."""
    ol, dl = _mv(rot.T, o - c[:, None]), _mv(rot.T, d)
    inv = 1.0 / np.where(np.abs(dl) < 1e-12, 1e-12, dl)
    t1, t2 = (-half[:, None] - ol) * inv, (half[:, None] - ol) * inv
    tmin3 = np.minimum(t1, t2)
    tnear, tfar = tmin3.max(0), np.maximum(t1, t2).min(0)
    hit = (tfar >= tnear) & (tnear > 1e-6)
    return np.where(hit, tnear, np.inf), tmin3.argmax(0)


def _hit_quad(o, d, c, ax, ay, half):
    n = np.cross(ax, ay)
    den = _dot(n, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = _dot(n, c[:, None] - o) / den
        p = o + t * d - c[:, None]
    inside = (np.abs(_dot(ax, p)) <= half[0]) & (np.abs(_dot(ay, p)) <= half[1])
    return np.where(inside & (t > 1e-6) & (np.abs(den) > 1e-12), t, np.inf)


def _objects_block(scene, o, d, tmax):
    """Shadow rays: True where any object lies between o and o + tmax * d. Room planes and the
    ground never shadow (the light is inside the convex room / the sun is above the ground)."""
    blocked = np.zeros(d.shape[1], bool)
    for s in scene["spheres"]:
        blocked |= _hit_sphere(o, d, s["c"], s["r"]) < tmax
    for b in scene["boxes"]:
        blocked |= _hit_box(o, d, b["c"], b["half"], b["rot"])[0] < tmax
    for q in scene["quads"]:
        blocked |= _hit_quad(o, d, q["c"], q["ax"], q["ay"], q["half"]) < tmax
    return blocked


def _texture(m, p_local, footprint):
    """Albedo (3, N) of a procedural solid texture at points (3, N) in the surface's frame. Where a
    pixel covers more than a cell (footprint, metres per pixel on the surface), fade to the palette's
    mean: a cheap anti-aliasing that avoids moire on far ground."""
    cell = np.floor(_mv(m["rot"].T, p_local) / m["scale"][:, None] + m["phase"][:, None]).astype(np.int64)
    h = (cell[0] * 73856093) ^ (cell[1] * 19349663) ^ (cell[2] * 83492791)  # a hash per cell
    h = (h ^ (h >> 13)) & 0x7FFFFFFF
    pat = m["pattern"]
    if pat == "checker":
        idx = (cell[0] + cell[1] + cell[2]) & 1
    elif pat == "stripes":
        idx = (cell[0] & 1) * 2
    elif pat == "tiles":
        idx = h % 4
    else:
        idx = np.zeros(cell.shape[1], np.int64)
    shade = 0.88 + 0.12 * ((h >> 4) % 8) / 7.0  # per-cell brightness variation
    used = {"checker": [0, 1], "stripes": [0, 2], "tiles": [0, 1, 2, 3]}.get(pat, [0])
    w = np.clip(footprint / m["scale"].min() - 0.5, 0, 1)
    return (1 - w) * m["colors"][idx].T * shade + w * 0.94 * m["colors"][used].mean(0)[:, None]


def render(scene, height, width, return_distance=False):
    """Ray-cast a scene description. Returns dict(rgb (H, W, 3) float32 in [0, 1], depth (H, W)
    float32 planar metres with 0 where invalid, valid (H, W) bool, focal (pixels)); with
    return_distance also distance (H, W) = Euclidean camera-to-hit length from the 3-D hit points.
    A description (see _draw_scene, or make_scene in test_data.py) holds: kind ('room' | 'open'),
    focal_frac, camera (pos, rot), planes (n, c: one-sided n . p = c), spheres (c, r), boxes (c, half,
    rot), quads (c, ax, ay, half), each with a material; light (sun: dir | point: pos, falloff;
    power), ambient, exposure, light_color, max_depth; open scenes also sky and fog."""
    focal = scene["focal_frac"] * width
    o, rot = scene["camera"]["pos"][:, None], scene["camera"]["rot"]
    v, u = np.meshgrid((np.arange(height) + 0.5 - height / 2) / focal,
                       (np.arange(width) + 0.5 - width / 2) / focal, indexing="ij")
    d = rot[:, 0:1] * u.ravel() + rot[:, 1:2] * v.ravel() + rot[:, 2:3]  # (3, N), camera-frame z = 1
    N = d.shape[1]
    t = np.full(N, np.inf)
    surf = np.full(N, -1)  # index into `surfaces` of the nearest hit
    face = np.zeros(N, np.int64)  # the box face's axis
    surfaces = ([("plane", s) for s in scene["planes"]] + [("sphere", s) for s in scene["spheres"]]
                + [("box", s) for s in scene["boxes"]] + [("quad", s) for s in scene["quads"]])
    for k, (kind, s) in enumerate(surfaces):
        if kind == "plane":
            tk = _hit_plane(o, d, s["n"], s["c"])
        elif kind == "sphere":
            tk = _hit_sphere(o, d, s["c"], s["r"])
        elif kind == "box":
            tk, axis = _hit_box(o, d, s["c"], s["half"], s["rot"])
        else:
            tk = _hit_quad(o, d, s["c"], s["ax"], s["ay"], s["half"])
        closer = tk < t
        t = np.where(closer, tk, t)
        surf = np.where(closer, k, surf)
        if kind == "box":
            face = np.where(closer, axis, face)

    hit = np.isfinite(t)
    p = o + np.where(hit, t, 0) * d  # (3, N) hit points
    normal, albedo = np.zeros((3, N)), np.zeros((3, N))
    dlen = np.sqrt(_dot(d, d))
    for k, (kind, s) in enumerate(surfaces):
        m = surf == k
        if not m.any():
            continue
        pk = p[:, m]
        if kind == "plane":
            nk, local = np.broadcast_to(s["n"][:, None], pk.shape), pk
        elif kind == "sphere":
            local = pk - s["c"][:, None]
            nk = local / s["r"]
        elif kind == "box":
            local = pk - s["c"][:, None]
            inbox = _mv(s["rot"].T, local)
            nl = np.zeros_like(inbox)
            cols = np.arange(pk.shape[1])
            nl[face[m], cols] = np.sign(inbox[face[m], cols])
            nk = _mv(s["rot"], nl)
        else:
            nk, local = np.broadcast_to(np.cross(s["ax"], s["ay"])[:, None], pk.shape), pk - s["c"][:, None]
        dk = d[:, m]
        nk = np.where(_dot(nk, dk) > 0, -nk, nk)  # face the camera (two-sided quads)
        cos = np.abs(_dot(nk, dk)) / dlen[m]
        footprint = t[m] * dlen[m] / focal / np.maximum(cos, 0.15)
        normal[:, m], albedo[:, m] = nk, _texture(s["material"], local, footprint)

    # Lambertian shading with one light and shadow rays
    light = scene["light"]
    if light["kind"] == "sun":
        to_l = np.broadcast_to(-light["dir"][:, None], p.shape)
        dist_l = np.full(N, np.inf)
        falloff = np.ones(N)
    else:
        to_l = light["pos"][:, None] - p
        dist_l = np.sqrt(_dot(to_l, to_l))
        to_l = to_l / np.maximum(dist_l, 1e-9)
        falloff = 1.5 / (1.0 + (dist_l / light["falloff"]) ** 2)
    ndotl = np.maximum(_dot(normal, to_l), 0) * hit
    idx = np.nonzero(ndotl > 0)[0]
    if len(idx):
        start = p[:, idx] + 1e-4 * normal[:, idx] * np.maximum(1, t[idx])  # off the surface
        ndotl[idx[_objects_block(scene, start, to_l[:, idx], dist_l[idx])]] = 0
    radiance = albedo * (scene["ambient"] + light["power"] * falloff * ndotl)
    radiance = radiance * (scene["light_color"] * scene["exposure"])[:, None]

    if scene["kind"] == "open":
        up = np.clip(d[1] / dlen, 0, 1) ** 0.6
        sky = (1 - up) * scene["sky"]["horizon"][:, None] + up * scene["sky"]["zenith"][:, None]
        haze = np.exp(-np.where(hit, t * dlen, np.inf) / scene["fog"])  # aerial perspective
        far = scene["sky"]["horizon"][:, None] ** 2.2  # linear light of the haze
        radiance = np.where(hit, haze * radiance + (1 - haze) * far, sky ** 2.2)
    rgb = np.clip(radiance, 0, 1) ** (1 / 2.2)  # linear -> display gamma

    valid = hit & (t < scene["max_depth"])
    out = dict(rgb=rgb.T.reshape(height, width, 3).astype(np.float32),
               depth=np.where(valid, t, 0).reshape(height, width).astype(np.float32),
               valid=valid.reshape(height, width), focal=float(focal))
    if return_distance:
        out["distance"] = np.where(hit, np.sqrt(_dot(p - o, p - o)), 0).reshape(height, width)
    return out


def render_scene(seed, height=96, width=128, return_distance=False):
    """The procedural scene `seed` rendered at height x width (see random_scene and render)."""
    return render(random_scene(seed), height, width, return_distance)
