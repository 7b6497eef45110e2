"""Per-frame image synthesis: the portrait warped by smooth landmark-anchored displacement fields.

Every output pixel samples the portrait at a position given in closed form (a backward map, so no
holes and no seams), built from three parts that act on their own regions:

* head: a rigid motion (translation, roll about the neck, nod, and a slight turn that shifts the
  middle of the face against its outline) weighted by a soft ellipse around the head, so the head
  moves and the background beyond the ellipse stays exactly put;
* mouth: the lower lip and jaw slide down from the line where the lips meet (the only cut in the field);
  the lower lip keeps the shape of a lens between the mouth corners and blends into a rigid jaw
  further down, the upper lip lifts a little, the corners move in (rounded) or out (spread); the gap
  opened along the cut is painted as a dark mouth cavity with a hint of upper teeth;
* eyes: the upper lid slides down to the lower lid (stretching the lid skin under the brow).

All geometry (face axes, lip and lid curves as lookup tables, regions of interest, the head weight on
a coarse grid) is computed once per avatar in `FaceWarper.__init__`; a frame costs a few vectorised
operations on the mouth and eye regions, one coarse-grid resize and one cv2.remap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.interpolate import PchipInterpolator

from emo_stream.face import LEFT_EYE, RIGHT_EYE


@dataclass(frozen=True)
class WarpConfig:
    max_jaw: float = 0.10        # inner-lip gap at the centre when fully open, fraction of face width
    upper_lip_lift: float = 0.18  # share of the opening made by the upper lip rising
    seam_position: float = 0.5   # photo with an open mouth: lips meet this far down the gap (0: upper lip)
    max_width: float = 0.20      # mouth corners move by this fraction of the mouth half-width
    width_reach_up: float = 0.18  # the corners' in/out motion fades out this far above the mouth ...
    width_reach_down: float = 0.32  # ... and this far below (face widths)
    lip_ramp: float = 0.22       # depth (face widths) over which the lower-lip shape blends into the jaw
    upper_ramp: float = 0.10     # height over which the upper-lip lift fades out towards the nose
    neck_falloff: float = 0.30   # below the chin the jaw motion fades out over this distance
    lid_margin: float = 0.05     # the moving lid's edge is taken this far (x eye height) below the
                                 # landmark lid line, so the dark lash line comes down with it
    lid_overlap: float = 0.25    # ... and closes this far below the lower-lid line
    lid_widen: float = 1.25      # the moving lid is this much wider than the landmark eye
    head_radius: tuple[float, float] = (0.80, 1.05)  # head ellipse radii, face widths (x, y)
    head_falloff: float = 0.40   # ellipse radius units over which head motion fades to zero
    grid_step: int = 8           # coarse-grid step (px) of the smooth head field


@dataclass
class FrameParams:
    jaw: float = 0.0      # 0 closed .. 1 open
    width: float = 0.0    # -1 rounded .. 1 spread
    blink: float = 0.0    # 0 open .. 1 closed
    tx: float = 0.0       # head translation, face widths
    ty: float = 0.0
    roll: float = 0.0     # radians
    nod: float = 0.0      # face widths, positive: chin down
    yaw: float = 0.0      # face widths the nose shifts sideways against the face outline (a slight turn)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    out = t * np.float32(-2.0)
    out += np.float32(3.0)
    out *= t
    out *= t
    return out


class _Curve:
    """y(u) of a smooth monotone-cubic curve through points (sorted by u), constant beyond its ends,
    as a dense lookup table (1/4 px steps)."""

    def __init__(self, u: np.ndarray, v: np.ndarray, step: float = 0.25):
        order = np.argsort(u)
        u, v = np.asarray(u, np.float64)[order], np.asarray(v, np.float64)[order]
        keep = np.concatenate([[True], np.diff(u) > 1e-3])  # pchip needs strictly increasing u
        u, v = u[keep], v[keep]
        self.u0 = float(u[0]) - 4.0
        n = int(np.ceil((u[-1] + 4.0 - self.u0) / step)) + 1
        self.step = step
        grid = np.clip(self.u0 + np.arange(n) * step, u[0], u[-1])
        table = PchipInterpolator(u, v)(grid) if len(u) > 2 else np.interp(grid, u, v)
        self.table = table.astype(np.float32)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        i = ((u - self.u0) * (1.0 / self.step)).astype(np.int32)
        np.clip(i, 0, len(self.table) - 1, out=i)
        return self.table[i]


def _roi(points: np.ndarray, margin: float, h: int, w: int) -> tuple[slice, slice]:
    x0, y0 = np.floor(points.min(0) - margin).astype(int)
    x1, y1 = np.ceil(points.max(0) + margin).astype(int)
    return slice(max(0, y0), min(h, y1)), slice(max(0, x0), min(w, x1))


def _intersect(a: tuple[slice, slice], b: tuple[slice, slice]) -> tuple[slice, slice]:
    out = []
    for sa, sb in zip(a, b):
        lo, hi = max(sa.start, sb.start), min(sa.stop, sb.stop)
        out.append(slice(lo, max(lo, hi)))
    return out[0], out[1]


class FaceWarper:
    """Renders frames of one portrait from per-frame `FrameParams`."""

    def __init__(self, image: np.ndarray, landmarks: np.ndarray, config: WarpConfig = WarpConfig()):
        self.image = np.ascontiguousarray(image)
        self.config = c = config
        h, w = image.shape[:2]
        lm = np.asarray(landmarks, np.float64)
        self.landmarks = lm.astype(np.float32)
        left_eye, right_eye = lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0)
        ang = np.arctan2(*(right_eye - left_eye)[::-1])
        self.cos, self.sin = float(np.cos(ang)), float(np.sin(ang))
        self.fw = fw = float(np.linalg.norm(lm[16] - lm[0]))
        self.ex = np.array([self.cos, self.sin])   # face "right"
        self.ey = np.array([-self.sin, self.cos])  # face "down"

        # ---- mouth geometry, in mouth coordinates (u along the eye line, v down) around its centre
        self.mc = lm[60:68].mean(0)
        mu, mv = self._to_local(lm, self.mc)
        cut_idx = [48, 60, 61, 62, 63, 64, 54]
        low_idx = [48, 60, 67, 66, 65, 64, 54]
        self.cut = _Curve(mu[cut_idx], mv[cut_idx])
        low = _Curve(mu[low_idx], mv[low_idx])
        self.gap = _Curve(mu[cut_idx], np.maximum(0, low(mu[cut_idx].astype(np.float32)) - mv[cut_idx]))
        self.gap_centre = float(self.gap.table.max())
        self.uc = float((mu[48] + mu[54]) / 2)
        self.half_mouth = float(max(2.0, (mu[54] - mu[48]) / 2))
        self.v_chin = float(mv[8])
        top = min(float(self.cut.table.min()) - c.upper_ramp * fw, -c.width_reach_up * fw) - 2
        bottom = self.v_chin + c.neck_falloff * fw
        # lateral reach: the jaw fades out at 0.5 face widths, the corner motion at 2 mouth half-widths
        reach = max(0.5 * fw, 2.0 * self.half_mouth)
        corners = np.array([[self.uc - reach, top], [self.uc + reach, top],
                            [self.uc - reach, bottom], [self.uc + reach, bottom]])
        # margin: head motion moves the face by at most a few hundredths of its width
        self.mouth_roi = _roi(self._to_image(corners, self.mc), 0.05 * fw + 2, h, w)
        # colours of the mouth interior, from the portrait's own lips and skin
        lip = self._sample_mean(lm[[57, 58, 56, 66]], radius=max(1, int(0.01 * fw)))
        cheeks = np.stack([(lm[31] + lm[3]) / 2, (lm[35] + lm[13]) / 2, lm[29]])
        skin = self._sample_mean(cheeks, radius=max(1, int(0.02 * fw)))
        luma = float(np.clip(skin @ np.array([0.299, 0.587, 0.114]) / 170.0, 0.45, 1.15))
        # painted colours keep the photo's saturation (a black-and-white photo gets grey teeth)
        chroma = float(np.clip((skin.max() - skin.min()) / max(skin.max(), 1.0) / 0.25, 0.0, 1.0))

        def tone(rgb: np.ndarray) -> np.ndarray:
            grey = float(rgb @ np.array([0.299, 0.587, 0.114]))
            return (grey + chroma * (rgb - grey)).clip(0, 255).astype(np.float32)

        self.cavity_colour = tone(0.22 * lip + np.array([10.0, 3.0, 4.0]))
        self.tongue_colour = tone(0.6 * lip + np.array([30.0, 5.0, 8.0]) * luma)
        self.teeth_colour = tone(np.array([218.0, 210.0, 196.0]) * luma)

        # ---- eyes: lid curves and the brow above them, in each eye's own coordinates
        self.eyes = []
        for idx, brow in ((range(36, 42), range(17, 22)), (range(42, 48), range(22, 27))):
            idx = list(idx)
            centre = lm[idx].mean(0)
            eu, ev = self._to_local(lm, centre)
            upper = _Curve(eu[[idx[0], idx[1], idx[2], idx[3]]], ev[[idx[0], idx[1], idx[2], idx[3]]])
            lower = _Curve(eu[[idx[0], idx[5], idx[4], idx[3]]], ev[[idx[0], idx[5], idx[4], idx[3]]])
            brow_v = np.minimum(ev[list(brow)], ev[idx[1:3]].min() - 0.07 * fw)
            brow_curve = _Curve(eu[list(brow)], brow_v)
            pts = np.concatenate([lm[idx], lm[list(brow)]])
            self.eyes.append((centre, upper, lower, brow_curve, _roi(pts, 0.05 * fw + 4, h, w)))

        # ---- head: a soft ellipse weight on a coarse grid over the region it covers
        self.head_centre = lm.mean(0) - 0.12 * fw * self.ey
        ra, rb = c.head_radius[0] * fw, c.head_radius[1] * fw
        reach = 1.0 + c.head_falloff
        ext = np.array([[-ra, -rb], [ra, -rb], [-ra, rb], [ra, rb]]) * reach
        self.head_roi = _roi(self._to_image(ext, self.head_centre), 2, h, w)
        ys, xs = self.head_roi
        self.roi_shape = (ys.stop - ys.start, xs.stop - xs.start)
        # finer cells on small images: bilinear spill past the ellipse stays under a pixel's worth
        step = max(2, min(c.grid_step, round(max(h, w) / 64)))
        gh = max(2, int(np.ceil(self.roi_shape[0] / step)))
        gw = max(2, int(np.ceil(self.roi_shape[1] / step)))
        # coarse sample positions matching cv2.resize's pixel-centre alignment
        gy = ys.start + (np.arange(gh) + 0.5) * self.roi_shape[0] / gh - 0.5
        gx = xs.start + (np.arange(gw) + 0.5) * self.roi_shape[1] / gw - 0.5
        self.grid_x, self.grid_y = np.meshgrid(gx.astype(np.float32), gy.astype(np.float32))
        hu, hv = self._to_local(np.stack([self.grid_x, self.grid_y], -1), self.head_centre)
        r = np.sqrt((hu / ra) ** 2 + (hv / rb) ** 2)
        self.head_weight = (1.0 - _smoothstep((r - 1.0) / c.head_falloff)).astype(np.float32)
        eyes_mid = (left_eye + right_eye) / 2
        _, nv = self._to_local(np.stack([self.grid_x, self.grid_y], -1), eyes_mid)
        eye_to_chin = max(1.0, float(np.dot(lm[8] - eyes_mid, self.ey)))
        # nods move the chin more than the forehead: reads as pitch rather than a slide
        self.nod_weight = (self.head_weight * np.clip(0.55 + 0.45 * nv / eye_to_chin, 0.25, 1.2)).astype(np.float32)
        self.pivot = lm[8] + 0.3 * fw * self.ey
        # a turn, in 2D: the middle of the face (nose, mouth, eyes) shifts more than its outline
        yu, yv = self._to_local(np.stack([self.grid_x, self.grid_y], -1), lm[30])
        self.yaw_weight = (self.head_weight * np.exp(-(yu / (0.32 * fw)) ** 2 - (yv / (0.5 * fw)) ** 2)).astype(np.float32)
        # the mouth and eye regions are edited inside the head map: keep them within it
        self.mouth_roi = _intersect(self.mouth_roi, self.head_roi)
        self.eyes = [e[:4] + (_intersect(e[4], self.head_roi),) for e in self.eyes]
        self._mouth_sub = self._relative(self.mouth_roi)
        # smooth per-pixel weights of the mouth region, precomputed on the still face (head sway moves
        # the face by a few pixels: negligible against fall-offs tens of pixels wide)
        gy0, gx0 = np.mgrid[self.mouth_roi].astype(np.float32)
        u0, v0 = self._map_to_local(gx0, gy0, self.mc)
        du0 = u0 - np.float32(self.uc)
        bu = np.clip(du0 / (2.0 * self.half_mouth), -1, 1)
        bv = np.clip(v0 / (np.where(v0 < 0, c.width_reach_up, c.width_reach_down) * fw), -1, 1)
        self._width_fall = ((1 - bu * bu) ** 2 * (1 - bv * bv) ** 2).astype(np.float32)
        neck = 1.0 - _smoothstep((v0 - self.v_chin) / (c.neck_falloff * fw))
        jaw_u = 1.0 - _smoothstep((np.abs(du0) - 0.2 * fw) / (0.3 * fw))
        self._neck = neck.astype(np.float32)
        self._jaw_neck = (jaw_u * neck).astype(np.float32)
        self._eye_subs = [self._relative(e[4]) for e in self.eyes]
        base_y, base_x = np.mgrid[ys, xs].astype(np.float32)
        self.base_x, self.base_y = base_x, base_y

    # ------------------------------------------------------------------ helpers
    def _relative(self, roi: tuple[slice, slice]) -> tuple[slice, slice]:
        """A region given in image pixels, as slices of the head map."""
        ys, xs = self.head_roi
        return (slice(roi[0].start - ys.start, roi[0].stop - ys.start),
                slice(roi[1].start - xs.start, roi[1].stop - xs.start))

    def _to_local(self, pts: np.ndarray, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.asarray(pts, np.float64) - origin
        return d[..., 0] * self.cos + d[..., 1] * self.sin, -d[..., 0] * self.sin + d[..., 1] * self.cos

    def _map_to_local(self, mx: np.ndarray, my: np.ndarray, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map positions (float32 arrays) in a part's local frame, kept in float32 for speed."""
        x = mx - np.float32(origin[0])
        y = my - np.float32(origin[1])
        c, s = np.float32(self.cos), np.float32(self.sin)
        return x * c + y * s, y * c - x * s

    def _to_image(self, uv: np.ndarray, origin: np.ndarray) -> np.ndarray:
        return origin + uv[..., :1] * self.ex + uv[..., 1:2] * self.ey

    def _sample_mean(self, pts: np.ndarray, radius: int) -> np.ndarray:
        h, w = self.image.shape[:2]
        vals = []
        for x, y in np.round(pts).astype(int):
            patch = self.image[max(0, y - radius):min(h, y + radius + 1), max(0, x - radius):min(w, x + radius + 1)]
            if patch.size:
                vals.append(patch.reshape(-1, 3).mean(0))
        return np.mean(vals, 0) if vals else np.array([120.0, 60.0, 60.0])

    # ------------------------------------------------------------------ fields
    def _head_map(self, p: FrameParams) -> tuple[np.ndarray, np.ndarray]:
        fw = self.fw
        ca, sa = np.cos(p.roll), np.sin(p.roll)
        dx0, dy0 = self.grid_x - self.pivot[0], self.grid_y - self.pivot[1]
        fx = (ca - 1) * dx0 - sa * dy0 + p.tx * fw
        fy = sa * dx0 + (ca - 1) * dy0 + p.ty * fw
        nod = p.nod * fw
        # backward map of a small motion: sample where the content came from
        coarse = np.empty(self.grid_x.shape + (2,), np.float32)
        yaw = p.yaw * fw
        coarse[..., 0] = -(self.head_weight * fx + self.nod_weight * nod * self.ey[0] + self.yaw_weight * yaw * self.ex[0])
        coarse[..., 1] = -(self.head_weight * fy + self.nod_weight * nod * self.ey[1] + self.yaw_weight * yaw * self.ex[1])
        dense = cv2.resize(coarse, self.roi_shape[::-1], interpolation=cv2.INTER_LINEAR)
        return self.base_x + dense[..., 0], self.base_y + dense[..., 1]

    def _mouth(self, p: FrameParams, mx: np.ndarray, my: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """Rewrites the mouth region of the map in place; returns cavity shading inputs."""
        c, fw = self.config, self.fw
        opening = max(0.0, p.jaw) * c.max_jaw * fw
        if opening < 0.3 and abs(p.width) < 0.02 and self.gap_centre < 0.5:
            return None
        u, v = self._map_to_local(mx, my, self.mc)
        du = u - self.uc
        # corners in or out: horizontal scaling about the mouth centre, fading with distance
        k = p.width * c.max_width
        if k:
            du = du - np.float32(k) * du * self._width_fall
            u = du + np.float32(self.uc)
        lens = np.sqrt(np.clip(1.0 - (du / (self.half_mouth * 0.92)) ** 2, 0.0, 1.0))
        cut = self.cut(u)
        gap = self.gap(u)
        # a photo with the mouth open closes on the midline between its lips (both lips move)
        seam = cut + c.seam_position * gap
        lift = c.upper_lip_lift * opening
        drop = opening - lift
        cut_out = seam - lift * lens
        low_out = seam + drop * lens
        above = v < cut_out
        upper = cut - cut_out  # where the upper lip's edge comes from, relative to where it is drawn
        disp = np.where(above, upper * (1.0 - _smoothstep((cut_out - v) / (c.upper_ramp * fw))), 0.0)
        below = v >= low_out
        # lower lip (b0: its own lens-shaped motion) blending into the rigid jaw, fading on the neck
        b0 = cut + gap - low_out
        jaw = np.float32((1.0 - c.seam_position) * self.gap_centre - drop)
        s = _smoothstep((v - low_out) * np.float32(1.0 / (c.lip_ramp * fw)))
        disp = np.where(below, b0 * (1.0 - s) * self._neck + (jaw * s) * self._jaw_neck, disp)
        vs = v + disp
        ox, oy = self.mc
        mx[...] = ox + u * self.cos - vs * self.sin
        my[...] = oy + u * self.sin + vs * self.cos
        if opening < 0.3:
            return None
        return du, v, cut_out, low_out, lens, opening

    def _eye(self, eye, blink: float, mx: np.ndarray, my: np.ndarray) -> None:
        """The upper lid (with its lash line) slides down over the eye to just below the lower lid;
        the eye under it does not move."""
        c = self.config
        centre, upper, lower, brow, _ = eye
        u, v = self._map_to_local(mx, my, centre)
        uw = u * np.float32(1.0 / c.lid_widen)  # a lid slightly wider than the landmark eye corners
        up, lo, br = upper(uw), lower(uw), brow(uw)
        height = np.maximum(lo - up, 0.0)
        lid_src = up + c.lid_margin * height   # where the lid edge comes from
        closed = lo + c.lid_overlap * height   # where it lands when the eye is shut
        edge = lid_src + blink * (closed - lid_src)
        t = np.clip((v - br) / np.maximum(edge - br, 1.0), 0.0, 1.0)
        lid = (v >= br) & (v < edge)
        # f(t) = 2t^2 - t^3: no kink under the brow; f(1) = 1 puts the lid edge exactly at `edge`
        vs = v - np.where(lid, (edge - lid_src) * (t * t * (2.0 - t)), 0.0)
        mx[...] = centre[0] + u * self.cos - vs * self.sin
        my[...] = centre[1] + u * self.sin + vs * self.cos

    def _paint_cavity(self, patch: np.ndarray, du, v, cut_out, low_out, lens, opening: float) -> None:
        fw = self.fw
        # anti-aliased inside test; thinner than a pixel near the corners -> proportionally transparent
        alpha = np.clip(np.minimum(np.minimum(v - cut_out, low_out - v) + 0.5, low_out - cut_out), 0.0, 1.0)
        rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
        if not len(rows):
            return
        # shade only the cavity's bounding box: a small part of the mouth region
        box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        patch, alpha, du, v, cut_out, low_out, lens = (
            x[box] for x in (patch, alpha, du, v, cut_out, low_out, lens))
        depth = np.clip((v - cut_out) / np.maximum(low_out - cut_out, 1.0), 0.0, 1.0)
        # upper teeth: a band under the upper lip, highest in the middle, hidden towards the corners,
        # shadowed by the lip above, with faint gaps between the front teeth
        tooth_max = min(0.5 * opening, 0.034 * fw)
        tooth = tooth_max * lens ** 1.5
        teeth = np.clip(cut_out + tooth - v + 0.5, 0.0, 1.0) * np.clip(lens * 2.0 - 0.3, 0.0, 1.0)
        below_lip = np.clip((v - cut_out) / max(tooth_max, 1.0), 0.0, 1.0)
        phase = np.abs(du) / (0.062 * fw)
        gaps = 1.0 - 0.22 * np.exp(-(((phase + 0.5) % 1.0 - 0.5) * 6.0) ** 2) * (phase > 0.5)
        gaps = gaps * (1.0 - 0.22 * np.exp(-(phase * 6.0) ** 2))
        teeth_shade = (0.45 + 0.55 * lens) * (0.62 + 0.38 * np.sqrt(below_lip)) * gaps
        tongue = _smoothstep((depth - 0.55) / 0.45) * min(1.0, opening / (0.05 * fw))
        colour = (self.cavity_colour[None, None] * (1.0 - tongue[..., None])
                  + self.tongue_colour[None, None] * tongue[..., None] * 0.6)
        colour = colour * (0.6 + 0.4 * lens[..., None])
        colour = colour * (1 - teeth[..., None]) + self.teeth_colour * (teeth * teeth_shade)[..., None]
        a = alpha[..., None]
        patch[...] = (patch * (1.0 - a) + colour * a).clip(0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ frame
    def render(self, p: FrameParams, out: np.ndarray | None = None,
               timings: dict[str, float] | None = None) -> np.ndarray:
        """One RGB uint8 frame for `p`; written into `out` when given. `timings` (optional) accumulates
        CPU seconds of this thread per stage (head, mouth, eyes, remap, cavity, copy), for the benchmark."""
        clock = time.thread_time if timings is not None else None
        marks: list[tuple[str, float]] = []

        def mark(name: str) -> None:
            if clock is not None:
                marks.append((name, clock()))

        mark("start")
        mx, my = self._head_map(p)
        mark("head")
        cavity = self._mouth(p, mx[self._mouth_sub], my[self._mouth_sub])
        mark("mouth")
        if p.blink > 0.01:
            for eye, sub in zip(self.eyes, self._eye_subs):
                self._eye(eye, p.blink, mx[sub], my[sub])
        mark("eyes")
        # fixed-point maps: what remap does internally anyway, converted in one pass (faster)
        m1, m2 = cv2.convertMaps(mx, my, cv2.CV_16SC2)
        warped = cv2.remap(self.image, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        mark("remap")
        if cavity is not None:
            self._paint_cavity(warped[self._mouth_sub], *cavity)
        mark("cavity")
        if out is None:
            out = self.image.copy()
        else:
            out[...] = self.image
        out[self.head_roi] = warped
        mark("copy")
        if timings is not None:
            for (_, t0), (name, t1) in zip(marks, marks[1:]):
                timings[name] = timings.get(name, 0.0) + (t1 - t0)
        return out
