"""Regenerate the example images in this folder (run: python assets/make_assets.py; needs scikit-image for cat.jpg).

Everything except cat.jpg is drawn here with PIL, so it is ours (CC0). cat.jpg is scikit-image's
`chelsea` sample photo: "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)."
"""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
S = 384


def canvas(color=(255, 255, 255)):
    image = Image.new("RGB", (S, S), color)
    return image, ImageDraw.Draw(image)


def dog(fur, ear, spot=None, name="dog"):
    image, d = canvas((235, 242, 250))
    d.ellipse((90, 190, 300, 330), fill=fur, outline=(40, 30, 20), width=3)  # body
    for x in (110, 150, 230, 270):  # legs
        d.rounded_rectangle((x, 300, x + 28, 360), 10, fill=fur, outline=(40, 30, 20), width=3)
    d.ellipse((120, 60, 270, 210), fill=fur, outline=(40, 30, 20), width=3)  # head
    d.ellipse((95, 75, 145, 185), fill=ear, outline=(40, 30, 20), width=3)  # ears
    d.ellipse((245, 75, 295, 185), fill=ear, outline=(40, 30, 20), width=3)
    if spot:
        d.ellipse((200, 220, 270, 280), fill=spot)
    d.ellipse((160, 115, 178, 133), fill=(20, 20, 20))  # eyes
    d.ellipse((212, 115, 230, 133), fill=(20, 20, 20))
    d.ellipse((170, 145, 220, 195), fill=(250, 240, 230), outline=(40, 30, 20), width=2)  # muzzle
    d.ellipse((185, 150, 205, 166), fill=(10, 10, 10))  # nose
    d.arc((180, 160, 210, 185), 20, 160, fill=(10, 10, 10), width=3)
    d.polygon([(300, 230), (350, 170), (340, 165), (295, 215)], fill=fur, outline=(40, 30, 20))  # tail
    image.save(HERE / f"{name}.jpg", quality=88)


def hat(name, crown, band, brim, tall=True):
    image, d = canvas()
    d.ellipse((50, 230, 334, 300), fill=brim, outline=(30, 30, 30), width=3)
    top = 70 if tall else 140
    d.rounded_rectangle((110, top, 274, 265), 18 if tall else 60, fill=crown, outline=(30, 30, 30), width=3)
    d.rectangle((111, 210, 273, 240), fill=band)
    image.save(HERE / f"{name}.jpg", quality=88)


def glasses(name, lens, frame, dark=False):
    image, d = canvas()
    for x in (50, 202):
        d.rounded_rectangle((x, 140, x + 132, 240), 40, fill=lens, outline=frame, width=10)
    d.arc((170, 150, 214, 200), 200, 340, fill=frame, width=10)  # bridge
    d.line((50, 170, 10, 150), fill=frame, width=8)
    d.line((334, 170, 374, 150), fill=frame, width=8)
    if not dark:
        for x in (80, 232):  # a glint on clear lenses
            d.line((x, 165, x + 30, 150), fill=(255, 255, 255), width=6)
    image.save(HERE / f"{name}.jpg", quality=88)


def surf_layout():
    """A simple scene for Canny: wave, surfboard, a dog shape standing on it."""
    image, d = canvas((120, 190, 230))
    d.rectangle((0, 250, S, S), fill=(30, 110, 170))
    d.chord((-60, 170, 240, 330), 180, 360, fill=(240, 250, 255))  # wave crest
    d.ellipse((70, 285, 330, 325), fill=(250, 200, 60), outline=(40, 40, 40), width=4)  # board
    d.ellipse((150, 170, 260, 280), fill=(150, 100, 60), outline=(40, 30, 20), width=4)  # body
    d.ellipse((215, 110, 295, 190), fill=(150, 100, 60), outline=(40, 30, 20), width=4)  # head
    d.ellipse((270, 115, 300, 165), fill=(110, 70, 40), outline=(40, 30, 20), width=3)  # ear
    for x in (165, 230):
        d.rectangle((x, 260, x + 20, 298), fill=(150, 100, 60), outline=(40, 30, 20), width=3)
    d.ellipse((300, 30, 360, 90), fill=(255, 230, 90))  # sun
    image.save(HERE / "surf_layout.png", optimize=True)


def cat():
    from skimage import data

    Image.fromarray(data.chelsea()).save(HERE / "cat.jpg", quality=90)


if __name__ == "__main__":
    cat()
    dog((200, 140, 80), (120, 80, 40), name="dog")
    dog((245, 245, 240), (40, 40, 40), spot=(40, 40, 40), name="dog_spotted")
    hat("hat", (200, 40, 40), (40, 40, 40), (200, 40, 40))
    hat("hat_straw", (230, 200, 120), (60, 90, 200), (225, 195, 115), tall=False)
    glasses("glasses", (220, 235, 245), (30, 30, 30))
    glasses("sunglasses", (20, 20, 30), (180, 30, 30), dark=True)
    surf_layout()
