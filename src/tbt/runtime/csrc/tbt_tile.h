/* TBT_DEFINE_TILE(name, body, target): the four register-tile specialisations of `body`
 * (4x4, 4x1, 1x4, 1x1 weight rows x activation rows) and the tile entry point `name` that
 * covers any nr, mr <= 4 with them. `body(w, ws, a, as, kpad, raw, NR, MR)` must be an
 * always-inline function; NR and MR are compile-time constants in each specialisation, so
 * its loops unroll. TBT_DEFINE_TILE_FAST(name, body, fast44, fast41, target) does the same
 * but uses hand-unrolled `fast44`/`fast41` (same signature as name##_44) for the two hot
 * shapes: GCC keeps their accumulators in named registers, where arrays of vectors made it
 * shuffle registers and spill inside the loop. */
#ifndef TBT_TILE_H
#define TBT_TILE_H

#define TBT_TILE_SPECIALISE(name, body, target, nr_, mr_)                                   \
  static target void name##_##nr_##mr_(const uint8_t *w, size_t ws, const uint8_t *a,        \
                                       size_t as, size_t kpad, int32_t raw[TBT_NR][TBT_MR]) { \
    body(w, ws, a, as, kpad, raw, nr_, mr_);                                                  \
  }

#define TBT_TILE_ENTRY(name)                                                                  \
  static void name(const uint8_t *w, size_t ws, int nr, const uint8_t *a, size_t as, int mr,  \
                   size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {                                \
    int32_t t[TBT_NR][TBT_MR];                                                                \
    if (nr == 4 && mr == 4) {                                                                 \
      name##_44(w, ws, a, as, kpad, raw);                                                     \
    } else if (nr == 4) {                                                                     \
      for (int m = 0; m < mr; ++m) {                                                          \
        name##_41(w, ws, a + m * as, as, kpad, t);                                            \
        for (int r = 0; r < 4; ++r) raw[r][m] = t[r][0];                                      \
      }                                                                                       \
    } else if (mr == 4) {                                                                     \
      for (int r = 0; r < nr; ++r) {                                                          \
        name##_14(w + r * ws, ws, a, as, kpad, t);                                            \
        for (int m = 0; m < 4; ++m) raw[r][m] = t[0][m];                                      \
      }                                                                                       \
    } else {                                                                                  \
      for (int r = 0; r < nr; ++r)                                                            \
        for (int m = 0; m < mr; ++m) {                                                        \
          name##_11(w + r * ws, ws, a + m * as, as, kpad, t);                                 \
          raw[r][m] = t[0][0];                                                                \
        }                                                                                     \
    }                                                                                         \
  }

#define TBT_DEFINE_TILE(name, body, target)                                                   \
  TBT_TILE_SPECIALISE(name, body, target, 4, 4)                                               \
  TBT_TILE_SPECIALISE(name, body, target, 4, 1)                                               \
  TBT_TILE_SPECIALISE(name, body, target, 1, 4)                                               \
  TBT_TILE_SPECIALISE(name, body, target, 1, 1)                                               \
  TBT_TILE_ENTRY(name)

#define TBT_DEFINE_TILE_FAST(name, body, fast44, fast41, target)                              \
  static target void name##_44(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,      \
                               size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {                    \
    fast44(w, ws, a, as, kpad, raw);                                                          \
  }                                                                                           \
  static target void name##_41(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,      \
                               size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {                    \
    fast41(w, ws, a, as, kpad, raw);                                                          \
  }                                                                                           \
  TBT_TILE_SPECIALISE(name, body, target, 1, 4)                                               \
  TBT_TILE_SPECIALISE(name, body, target, 1, 1)                                               \
  TBT_TILE_ENTRY(name)

#endif /* TBT_TILE_H */
