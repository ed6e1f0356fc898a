"""The built-in calibration set (`builtin-v2`): what InternVL is used for, offline, a few hundred KB.

Kinds, drawn in a fixed proportion (SCHEDULE) with a seeded RNG, so the same count and seed give
the same samples on every machine (only PIL's bundled font is used, never a system font):

- photo: 13 CC0 / public-domain photographs shipped in `calibrate/data/` (from scikit-image's
  wheel; data/LICENSES.md), randomly cropped to one of several aspect ratios and resized so
  dynamic tiling gives 1 to 6 tiles, with descriptions, questions and answers (English and Chinese).
- document: rendered pages (title, paragraphs of English prose, portrait or two-column), asked
  for the title, a sentence, a summary.
- chart: bar, line and pie charts with titles, labels and values, asked for the largest
  category, a value, a trend.
- table: grids with a header row (prices, populations, timetables), asked for a cell, a count,
  the largest row.
- ocr: text-in-image crops (signs, labels, receipts, serial numbers) on textured backgrounds,
  asked to read them.
- multi_turn: a photo, chart or table with two or three turns, some of them in Chinese.
- text_en: text-only instructions (summaries, arithmetic word problems, code, translation
  into French / German / Spanish, continuation of prose from Python's own docstrings).
- text_zh: Chinese instructions and answers (knowledge, reasoning, translation).

PIL's bundled font has no CJK glyphs, so Chinese appears in prompts and answers, never inside
rendered images. Everything is generated on the fly; only the photos are files.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

VERSION = "builtin-v2"
DATA = Path(__file__).with_name("data")
KINDS = ("photo", "document", "chart", "table", "ocr", "multi_turn", "text_en", "text_zh")
# one block of 20 samples; shuffled per block by the seeded RNG
SCHEDULE = (["photo"] * 4 + ["document"] * 3 + ["chart"] * 2 + ["table"] * 2 + ["ocr"] * 2 + ["multi_turn"] * 2
            + ["text_en"] * 3 + ["text_zh"] * 2)
# (width, height) of a rendered or resized picture: 1 to 6 tiles under InternVL's dynamic tiling
SIZES = {"square": [(448, 448), (672, 672), (896, 896)], "wide": [(896, 448), (1344, 448), (896, 672), (1344, 896)],
         "tall": [(448, 896), (448, 1344), (672, 896), (896, 1344)], "photo": [(640, 480), (800, 600), (1024, 576), (480, 640)]}

# name -> (English description, Chinese description, [(question, answer), ...])
PHOTOS = {
    "astronaut": (
        "A smiling woman astronaut in an orange flight suit poses for an official portrait. An American flag hangs on the left, "
        "a model of the Space Shuttle stands behind her, and she holds a white and black helmet on her lap.",
        "一位穿着橙色飞行服的女宇航员面带微笑地拍摄官方肖像。左边挂着一面美国国旗，身后是航天飞机模型，她手里拿着一个头盔。",
        [("What is the person wearing?", "An orange astronaut flight suit with mission patches."),
         ("Is there a flag in the picture? Answer yes or no.", "Yes"),
         ("What object stands behind the person?", "A model of the Space Shuttle."),
         ("图中的人是做什么工作的？", "她是一名宇航员。")]),
    "camera": (
        "A black and white photograph of a man in a dark coat looking through a film camera mounted on a tripod, standing on a "
        "lawn with buildings and a dome in the distance.",
        "一张黑白照片：一名穿深色大衣的男子站在草坪上，通过三脚架上的相机取景，远处有建筑物和圆顶。",
        [("Is this a color photograph? Answer yes or no.", "No"),
         ("What is the man doing?", "He is looking through a camera on a tripod."),
         ("What is in the background?", "Buildings, a tower and a dome under a clear sky."),
         ("这张照片是彩色的吗？", "不是，这是一张黑白照片。")]),
    "chelsea": (
        "A close-up of a tabby cat with green eyes, a pink nose and long white whiskers, looking slightly to the side.",
        "一只虎斑猫的特写，它有绿色的眼睛、粉色的鼻子和长长的白胡须。",
        [("What animal is this?", "A cat."), ("What color are its eyes?", "Green."),
         ("Is the animal a dog? Answer yes or no.", "No"), ("这是什么动物？", "这是一只猫。")]),
    "coffee": (
        "A cup of espresso with crema in a red and white cup on a red saucer with a silver spoon, on a wooden table.",
        "木桌上放着一杯意式浓缩咖啡，红白相间的杯子放在红色碟子上，旁边有一把银色的小勺。",
        [("What drink is in the cup?", "Coffee, an espresso."), ("What color is the saucer?", "Red."),
         ("How many spoons are there?", "One"), ("杯子里是什么饮料？", "是咖啡。")]),
    "rocket": (
        "A rocket stands on the launch pad at night, lit by floodlights, between tall lightning towers under a deep blue sky.",
        "夜晚，一枚火箭矗立在发射台上，被探照灯照亮，周围是高高的避雷塔。",
        [("Is it day or night?", "Night."), ("What is standing in the middle of the picture?", "A rocket on its launch pad."),
         ("How many towers surround the rocket?", "Four"), ("图片中间是什么？", "一枚准备发射的火箭。")]),
    "hubble_deep_field": (
        "A deep space image full of distant galaxies: small spirals and ellipticals in white, orange and blue on a black background.",
        "一张深空图像，黑色背景上布满了遥远的星系，有白色、橙色和蓝色的小螺旋星系和椭圆星系。",
        [("What does this image show?", "Thousands of distant galaxies seen by a space telescope."),
         ("What color is the background?", "Black."), ("这张图拍的是什么？", "宇宙深处的许多星系。")]),
    "retina": (
        "A medical fundus photograph of a human retina: an orange-red disc with blood vessels spreading from the bright optic "
        "disc on the left and a darker macula in the center.",
        "一张视网膜眼底照片：橙红色的圆形区域中，血管从左侧明亮的视盘向外延伸，中间是颜色较深的黄斑。",
        [("What kind of image is this?", "A fundus photograph of the retina of an eye."),
         ("Where is the optic disc?", "On the left side."), ("这是什么类型的医学图像？", "眼底照片。")]),
    "text": (
        "A photograph of handwritten mathematics on paper, seen at an angle: equations with integrals and the letter s.",
        "一张斜拍的纸上手写数学公式的照片，其中有积分和字母 s。",
        [("Is the writing printed or handwritten?", "Handwritten."), ("What is written on the paper?", "Mathematical equations."),
         ("纸上写的是什么？", "手写的数学公式。")]),
    "clock_motion": (
        "A blurred photograph of a round clock on a grey wall; the motion blur makes the hands unreadable.",
        "一张模糊的照片，灰色墙上有一个圆形时钟，由于运动模糊看不清指针。",
        [("Can you read the time? Answer yes or no.", "No"), ("Why is the image hard to read?", "It is blurred by motion."),
         ("这张照片清晰吗？", "不清晰，有运动模糊。")]),
    "horse": (
        "A black silhouette of a standing horse facing right on a white background.",
        "白色背景上一匹面朝右站立的马的黑色剪影。",
        [("What animal is shown?", "A horse."), ("Which way is the horse facing?", "To the right."),
         ("这是什么动物的剪影？", "马。")]),
    "cell": (
        "A grey microscope image of a single round cell floating in saline, with a bright center and a dark rim.",
        "一张灰色的显微镜图像，一个圆形细胞漂浮在盐水中，中心明亮，边缘较暗。",
        [("What instrument took this image?", "A microscope."), ("How many cells are visible?", "One"),
         ("图中有几个细胞？", "一个。")]),
    "brick": (
        "A grey brick wall seen in perspective, with long rectangular bricks laid in staggered rows.",
        "从斜角拍摄的灰色砖墙，长方形的砖块错缝排列。",
        [("What is this surface made of?", "Bricks."), ("这是什么材质的墙？", "砖墙。")]),
    "grass": (
        "A grey close-up texture of grass and small leaves covering the whole frame.",
        "一张灰色的草地纹理特写，小草和叶子铺满了整个画面。",
        [("What texture is this?", "Grass."), ("Is there a person in the image? Answer yes or no.", "No")]),
}

DOC_TOPICS = [
    ("Annual Report 2023", "Revenue grew in every region while costs stayed flat, and the board approved a new dividend."),
    ("Meeting Minutes", "The team agreed on the release date, assigned the remaining tasks and scheduled a review for Friday."),
    ("Safety Instructions", "Read all instructions before use, keep the device dry and unplug it before cleaning."),
    ("Product Manual", "Press and hold the power button for three seconds to turn the device on; the light turns green."),
    ("Research Abstract", "We propose a simple method that reduces memory use by half while keeping accuracy within one point."),
    ("Invoice", "Payment is due within thirty days; please quote the invoice number with your transfer."),
    ("Recipe: Tomato Soup", "Cook onions and garlic, add tomatoes and stock, simmer for twenty minutes and blend until smooth."),
    ("Travel Itinerary", "Day one is spent in the old town, day two at the museum, and day three on a boat trip."),
    ("Lease Agreement", "The tenant pays rent on the first of each month and gives two months' notice before leaving."),
    ("Course Syllabus", "Weekly lectures cover linear algebra, probability and optimisation, with a project at the end."),
]
CHART_DATA = [
    ("Monthly Sales", ["Jan", "Feb", "Mar", "Apr", "May", "Jun"], "units"),
    ("Fruit Harvest", ["Apples", "Pears", "Plums", "Cherries", "Grapes"], "tons"),
    ("Visitors per City", ["Paris", "Tokyo", "Cairo", "Lima", "Oslo"], "thousands"),
    ("Energy Mix", ["Solar", "Wind", "Hydro", "Gas", "Coal"], "percent"),
    ("Quarterly Revenue", ["Q1", "Q2", "Q3", "Q4"], "million USD"),
    ("Rainfall", ["2018", "2019", "2020", "2021", "2022", "2023"], "mm"),
]
TABLES = [
    (["Item", "Price", "Quantity"], [["Notebook", "Pen", "Stapler", "Folder", "Ruler", "Marker", "Eraser"]], "price"),
    (["City", "Country", "Population (M)"], [["Shanghai", "Beijing", "Berlin", "Madrid", "Nairobi", "Toronto", "Sydney"]], "population"),
    (["Train", "Departs", "Arrives", "Platform"], [["IC 101", "RE 7", "ICE 512", "S 3", "EC 88", "IR 26"]], "timetable"),
    (["Student", "Math", "Physics", "Chemistry"], [["Alice", "Bob", "Chen Wei", "Dana", "Li Na", "Omar"]], "grades"),
]
CITIES_COUNTRY = {"Shanghai": "China", "Beijing": "China", "Berlin": "Germany", "Madrid": "Spain", "Nairobi": "Kenya",
                  "Toronto": "Canada", "Sydney": "Australia"}
SIGNS = ["EXIT", "NO PARKING", "OPEN 24 HOURS", "PLATFORM 4", "FRESH BREAD", "CAUTION WET FLOOR", "PUSH", "KEEP CLEAR",
         "SALE 50% OFF", "ROOM 214", "STAFF ONLY", "WELCOME", "GATE B12", "SPEED LIMIT 30", "PHARMACY", "LIBRARY"]
RECEIPT_ITEMS = ["Milk", "Bread", "Eggs", "Apples", "Coffee", "Rice", "Cheese", "Tea", "Butter", "Pasta", "Tomatoes", "Soap"]

TEXT_EN = [
    ("Explain in two sentences why the sky is blue.",
     "Sunlight is scattered by the molecules of the air, and blue light, with its short wavelength, is scattered much more "
     "than red light. So blue light reaches our eyes from every direction of the sky."),
    ("Write a Python function that returns the largest number in a list without using max().",
     "def largest(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n            best = n\n    return best"),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("Give three tips for writing a clear email.",
     "1. Put the main request in the first sentence.\n2. Keep paragraphs short.\n3. End with the action and the deadline you need."),
    ("Convert 5 kilometres to miles.", "5 kilometres is about 3.11 miles (1 km = 0.621 miles)."),
    ("What is the difference between a list and a tuple in Python?",
     "A list is mutable: you can add, remove and change items. A tuple is immutable and can be used as a dictionary key."),
    ("Write a SQL query that counts the orders of each customer.",
     "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nGROUP BY customer_id;"),
    ("Name the planets of the solar system in order from the Sun.",
     "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
]
TRANSLATE = [
    ("Good morning, how are you?", {"French": "Bonjour, comment allez-vous ?", "German": "Guten Morgen, wie geht es Ihnen?",
                                    "Spanish": "Buenos días, ¿cómo está?"}),
    ("The train leaves at eight o'clock.", {"French": "Le train part à huit heures.", "German": "Der Zug fährt um acht Uhr ab.",
                                            "Spanish": "El tren sale a las ocho."}),
    ("Where is the nearest pharmacy?", {"French": "Où est la pharmacie la plus proche ?", "German": "Wo ist die nächste Apotheke?",
                                        "Spanish": "¿Dónde está la farmacia más cercana?"}),
    ("Thank you for your help.", {"French": "Merci pour votre aide.", "German": "Danke für Ihre Hilfe.",
                                  "Spanish": "Gracias por su ayuda."}),
]
TEXT_ZH = [
    ("请用一句话介绍长城。", "长城是中国古代修建的军事防御工程，总长度超过两万公里，是世界上最著名的建筑之一。"),
    ("为什么天空是蓝色的？", "阳光穿过大气层时，波长较短的蓝光比红光更容易被空气分子散射，所以我们看到的天空是蓝色的。"),
    ("把下面的句子翻译成英文：今天天气很好，我们去公园散步吧。", "The weather is nice today, let's go for a walk in the park."),
    ("把下面的句子翻译成中文：Knowledge is power.", "知识就是力量。"),
    ("小明有12个苹果，给了小红5个，又买了8个，他现在有几个苹果？", "12 - 5 + 8 = 15，所以小明现在有15个苹果。"),
    ("请写一首关于春天的四行短诗。", "春风吹绿江南岸，\n桃花朵朵笑开颜。\n燕子归来寻旧垒，\n细雨无声润良田。"),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("请解释什么是人工智能。", "人工智能是让计算机模拟人类智能的技术，包括学习、推理、感知和理解语言等能力。"),
    ("列出三种保持健康的方法。", "1. 均衡饮食，多吃蔬菜水果。\n2. 每周坚持运动。\n3. 保证充足的睡眠。"),
    ("用Python写一个计算阶乘的函数。", "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result"),
    ("请总结下面这段话：会议决定下周一发布新版本，测试团队需要在周五之前完成所有测试。",
     "会议决定下周一发布新版本，测试需在周五前完成。"),
    ("水的沸点是多少？", "在一个标准大气压下，水的沸点是100摄氏度。"),
    ("请比较一下猫和狗作为宠物的特点。", "猫比较独立，适合空间小、工作忙的人；狗更需要陪伴和运动，但通常更亲近主人。"),
    ("一年有多少个月？哪几个月有31天？", "一年有12个月。1月、3月、5月、7月、8月、10月和12月有31天。"),
]
ZH_IMAGE_QUESTIONS = {"describe": "请详细描述这张图片。", "title": "这个文档的标题是什么？", "largest": "图表中哪一项的数值最大？",
                      "read": "图片中的文字是什么？", "rows": "这个表格有几行数据（不含表头）？"}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled font at `size` px (the bitmap default on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def photo_names() -> list[str]:
    """The shipped photos that are present (all of them in a normal install)."""
    return [name for name in PHOTOS if (DATA / f"{name}.jpg").exists()]


def load_photo(rng: random.Random, name: str) -> Image.Image:
    """A shipped photo, cropped to a random aspect ratio and resized to a tiling-friendly size."""
    image = Image.open(DATA / f"{name}.jpg").convert("RGB")
    w, h = image.size
    target = rng.choice(SIZES[rng.choice(["square", "wide", "tall", "photo", "photo"])])
    ratio = target[0] / target[1]
    crop_w, crop_h = (w, min(h, round(w / ratio))) if w / h < ratio else (min(w, round(h * ratio)), h)
    crop_w, crop_h = max(1, round(crop_w * rng.uniform(0.8, 1.0))), max(1, round(crop_h * rng.uniform(0.8, 1.0)))
    x, y = rng.randint(0, w - crop_w), rng.randint(0, h - crop_h)
    return image.crop((x, y, x + crop_w, y + crop_h)).resize(target, Image.BICUBIC)


def _wrap(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=face) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def _paper(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    tone = rng.choice([(255, 255, 255), (250, 247, 238), (245, 245, 240), (236, 240, 245)])
    return Image.new("RGB", size, tone)


def render_document(rng: random.Random, paragraphs: list[str]) -> tuple[Image.Image, str, str, str]:
    """A page: title, summary line, prose in one or two columns. Returns (image, title, summary, first sentence)."""
    title, summary = rng.choice(DOC_TOPICS)
    size = rng.choice(SIZES["tall"] + SIZES["square"] + [(896, 672)])
    image = _paper(rng, size)
    draw = ImageDraw.Draw(image)
    margin, body = size[0] // 14, max(14, size[0] // rng.choice([24, 28, 32, 36]))
    draw.text((margin, margin), title, fill=(10, 10, 10), font=font(body * 2))
    y = margin + body * 3
    for line in _wrap(draw, summary, font(body + 2), size[0] - 2 * margin):
        draw.text((margin, y), line, fill=(60, 60, 60), font=font(body + 2))
        y += int((body + 2) * 1.4)
    draw.line([(margin, y + 4), (size[0] - margin, y + 4)], fill=(120, 120, 120), width=2)
    y += body
    columns = 2 if size[0] >= 672 and rng.random() < 0.5 else 1
    col_width = (size[0] - 2 * margin - (columns - 1) * margin) // columns
    text = " ".join(paragraphs)
    first = " ".join(text.split(". ")[0].split()).rstrip(".") + "."
    words = text.split()
    for col in range(columns):
        x, cy = margin + col * (col_width + margin), y
        while words and cy < size[1] - margin - body:
            line = words.pop(0)
            while words and draw.textlength(line + " " + words[0], font=font(body)) <= col_width:
                line += " " + words.pop(0)
            draw.text((x, cy), line, fill=(25, 25, 25), font=font(body))
            cy += int(body * 1.45)
    draw.text((size[0] // 2 - 10, size[1] - margin // 2 - body), str(rng.randint(1, 40)), fill=(90, 90, 90), font=font(body))
    return image, title, summary, first


def render_chart(rng: random.Random) -> tuple[Image.Image, dict]:
    """A bar, line or pie chart. Returns (image, facts: title, kind, labels, values, unit)."""
    title, labels, unit = rng.choice(CHART_DATA)
    labels = labels[: rng.randint(max(3, len(labels) - 2), len(labels))]
    kind = rng.choice(["bar", "bar", "line", "pie"])
    values = [rng.randint(5, 95) for _ in labels]
    if kind == "pie" or unit == "percent":
        total = sum(values)
        values = [round(100 * v / total) for v in values]
        unit = "percent"
    size = rng.choice(SIZES["wide"][:3] + [(672, 448), (448, 448)])
    image = Image.new("RGB", size, rng.choice([(255, 255, 255), (248, 248, 252)]))
    draw = ImageDraw.Draw(image)
    w, h = size
    small = max(12, h // 28)
    draw.text((w // 2 - draw.textlength(title, font=font(small + 6)) // 2, 10), title, fill=(20, 20, 20), font=font(small + 6))
    left, right, top, bottom = 60, w - 30, 50, h - 50
    if kind == "pie":
        diameter = min(bottom - top, w // 2)
        box = [left - 20, top, left - 20 + diameter, top + diameter]
        start = -90.0
        for i, (label, value) in enumerate(zip(labels, values)):
            end = start + 360.0 * value / max(1, sum(values))
            draw.pieslice(box, start, end, fill=PALETTE[i % len(PALETTE)], outline=(255, 255, 255))
            start = end
            ly = top + i * (small + 10)
            draw.rectangle([box[2] + 30, ly, box[2] + 30 + small, ly + small], fill=PALETTE[i % len(PALETTE)])
            draw.text((box[2] + 40 + small, ly), f"{label} {value}%", fill=(20, 20, 20), font=font(small))
    else:
        draw.line([(left, top), (left, bottom), (right, bottom)], fill=(40, 40, 40), width=2)
        top_value = max(values) * 1.15
        for tick in range(0, int(top_value) + 1, max(10, int(top_value) // 5 // 10 * 10 or 10)):
            ty = bottom - (bottom - top) * tick / top_value
            draw.line([(left - 4, ty), (left, ty)], fill=(40, 40, 40))
            draw.text((left - 40, ty - small // 2), str(tick), fill=(60, 60, 60), font=font(small - 2))
        step = (right - left) / len(labels)
        points = []
        for i, (label, value) in enumerate(zip(labels, values)):
            cx = left + step * (i + 0.5)
            vy = bottom - (bottom - top) * value / top_value
            if kind == "bar":
                draw.rectangle([cx - step * 0.3, vy, cx + step * 0.3, bottom], fill=PALETTE[i % len(PALETTE)] if rng.random() < 0.5 else PALETTE[0])
            points.append((cx, vy))
            draw.text((cx - draw.textlength(str(value), font=font(small - 2)) / 2, vy - small - 2), str(value), fill=(20, 20, 20), font=font(small - 2))
            draw.text((cx - draw.textlength(label, font=font(small)) / 2, bottom + 6), label, fill=(20, 20, 20), font=font(small))
        if kind == "line":
            draw.line(points, fill=PALETTE[3], width=3)
            for px, py in points:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=PALETTE[3])
        draw.text((8, top - 24), unit, fill=(60, 60, 60), font=font(small - 2))
    return image, {"title": title, "kind": kind, "labels": labels, "values": values, "unit": unit}


def render_table(rng: random.Random) -> tuple[Image.Image, dict]:
    """A table with a header row. Returns (image, facts: header, rows, kind)."""
    header, (names,), kind = rng.choice(TABLES)
    names = rng.sample(names, rng.randint(3, min(6, len(names))))
    rows = []
    for name in names:
        if kind == "price":
            rows.append([name, f"{rng.randint(1, 30)}.{rng.choice(['00', '50', '99', '25'])}", str(rng.randint(1, 40))])
        elif kind == "population":
            rows.append([name, CITIES_COUNTRY[name], f"{rng.uniform(1, 25):.1f}"])
        elif kind == "timetable":
            hour = rng.randint(5, 21)
            rows.append([name, f"{hour:02d}:{rng.choice(['05', '20', '35', '50'])}", f"{hour + rng.randint(1, 3):02d}:{rng.choice(['10', '25', '40', '55'])}",
                         str(rng.randint(1, 12))])
        else:
            rows.append([name] + [str(rng.randint(55, 100)) for _ in header[1:]])
    size = rng.choice([(672, 448), (896, 448), (896, 672), (448, 448), (448, 672)])
    image = _paper(rng, size)
    draw = ImageDraw.Draw(image)
    body = max(13, min(22, size[1] // (2 * (len(rows) + 2))))
    margin = 20
    col_w = (size[0] - 2 * margin) / len(header)
    row_h = min((size[1] - 2 * margin) / (len(rows) + 1), body * 2.4)
    shade = rng.choice([(210, 225, 240), (230, 230, 230), (220, 240, 220)])
    draw.rectangle([margin, margin, size[0] - margin, margin + row_h], fill=shade)
    for r, row in enumerate([header] + rows):
        ry = margin + r * row_h
        for c, cell in enumerate(row):
            draw.text((margin + c * col_w + 8, ry + (row_h - body) / 2), cell, fill=(15, 15, 15), font=font(body))
        draw.line([(margin, ry + row_h), (size[0] - margin, ry + row_h)], fill=(120, 120, 120))
    for c in range(len(header) + 1):
        draw.line([(margin + c * col_w, margin), (margin + c * col_w, margin + row_h * (len(rows) + 1))], fill=(120, 120, 120))
    return image, {"header": header, "rows": rows, "kind": kind}


def render_ocr(rng: random.Random) -> tuple[Image.Image, str, str]:
    """Text in an image: a sign, a label with a serial number, or a receipt. Returns (image, text, kind)."""
    kind = rng.choice(["sign", "sign", "label", "receipt"])
    if kind == "receipt":
        items = [(name, rng.randint(1, 9) + rng.choice([0.0, 0.25, 0.5, 0.99])) for name in rng.sample(RECEIPT_ITEMS, rng.randint(3, 7))]
        total = sum(price for _, price in items)
        size = rng.choice([(448, 896), (336, 896), (448, 1344)])
        image = Image.new("RGB", size, (252, 252, 248))
        draw = ImageDraw.Draw(image)
        body = 20
        y = 30
        shop = rng.choice(["CORNER MARKET", "FRESH FOODS", "CITY GROCER", "GREEN SHOP"])
        draw.text((30, y), shop, fill=(10, 10, 10), font=font(body + 6))
        y += 60
        for name, price in items:
            draw.text((30, y), name, fill=(20, 20, 20), font=font(body))
            draw.text((size[0] - 110, y), f"{price:.2f}", fill=(20, 20, 20), font=font(body))
            y += 34
        draw.line([(30, y), (size[0] - 30, y)], fill=(40, 40, 40), width=2)
        draw.text((30, y + 12), "TOTAL", fill=(0, 0, 0), font=font(body + 2))
        draw.text((size[0] - 110, y + 12), f"{total:.2f}", fill=(0, 0, 0), font=font(body + 2))
        return image.filter(ImageFilter.GaussianBlur(0.6)), f"{shop}; total {total:.2f}", "receipt"
    text = rng.choice(SIGNS) if kind == "sign" else f"SN {rng.randint(10000, 99999)}-{rng.choice('ABCDEFGHJK')}{rng.randint(10, 99)}"
    size = rng.choice([(448, 448), (896, 448), (672, 448), (1344, 448)])
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for _ in range(40):  # texture
        x, y = rng.randint(0, size[0]), rng.randint(0, size[1])
        shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in background)
        draw.ellipse([x, y, x + rng.randint(10, 80), y + rng.randint(10, 80)], fill=shade)
    face = font(rng.choice([36, 48, 64]))
    width = draw.textlength(text, font=face)
    board = rng.choice([(250, 250, 250), (20, 90, 40), (180, 20, 20), (20, 40, 120), (240, 200, 0)])
    ink = (0, 0, 0) if sum(board) > 500 else (255, 255, 255)
    x0, y0 = (size[0] - width) / 2, size[1] / 2 - face.size
    draw.rectangle([x0 - 20, y0 - 15, x0 + width + 20, y0 + face.size * 1.6], fill=board)
    draw.text((x0, y0), text, fill=ink, font=face)
    image = image.rotate(rng.uniform(-6, 6), resample=Image.BICUBIC, fillcolor=background)
    return image, text, kind


def photo_sample(rng: random.Random):
    name = rng.choice(photo_names())
    en, zh, qas = PHOTOS[name]
    choice = rng.random()
    if choice < 0.3:
        return load_photo(rng, name), "Describe the image in detail.", en
    if choice < 0.45:
        return load_photo(rng, name), ZH_IMAGE_QUESTIONS["describe"], zh
    question, answer = rng.choice(qas)
    return load_photo(rng, name), question, answer


def document_sample(rng: random.Random, corpus: list[str]):
    start = rng.randrange(len(corpus))
    image, title, summary, first = render_document(rng, corpus[start : start + 8])
    question, answer = rng.choice([
        ("What is the title of this document?", title),
        (ZH_IMAGE_QUESTIONS["title"], f"标题是“{title}”。"),
        ("Summarize the document in one sentence.", summary),
        ("Read the first sentence of the main text.", first),
        ("What kind of document is this? Answer briefly.", title.split(":")[0]),
    ])
    return image, question, answer


def chart_question(rng: random.Random, facts: dict) -> tuple[str, str]:
    labels, values, unit = facts["labels"], facts["values"], facts["unit"]
    best = labels[values.index(max(values))]
    pick = rng.randrange(len(labels))
    trend = "increases" if values[-1] > values[0] else "decreases"
    return rng.choice([
        ("Which category has the highest value?", best),
        (ZH_IMAGE_QUESTIONS["largest"], f"数值最大的是{best}（{max(values)}）。"),
        (f"What is the value for {labels[pick]}?", f"{values[pick]}"),
        ("What is the title of the chart?", facts["title"]),
        ("Describe the chart.", f"A {facts['kind']} chart titled \"{facts['title']}\" showing {unit} for {', '.join(labels)}. "
                                f"The highest value is {best} with {max(values)} and the lowest is "
                                f"{labels[values.index(min(values))]} with {min(values)}."),
        (f"From {labels[0]} to {labels[-1]}, does the value increase or decrease?", f"It {trend}, from {values[0]} to {values[-1]}."),
    ])


def table_question(rng: random.Random, facts: dict) -> tuple[str, str]:
    header, rows, kind = facts["header"], facts["rows"], facts["kind"]
    row = rng.choice(rows)
    column = rng.randrange(1, len(header))
    numeric = [float(r[-1]) for r in rows] if kind in ("price", "population", "grades") else None
    options = [
        (f"In the row of {row[0]}, what is the {header[column]}?", row[column]),
        ("How many rows of data does the table have, not counting the header?", str(len(rows))),
        (ZH_IMAGE_QUESTIONS["rows"], f"{len(rows)}行。"),
        ("What are the column headers?", ", ".join(header)),
    ]
    if numeric:
        options.append((f"Which {header[0].lower()} has the largest {header[-1]}?", rows[numeric.index(max(numeric))][0]))
    return rng.choice(options)


def ocr_sample(rng: random.Random):
    image, text, kind = render_ocr(rng)
    if kind == "receipt":
        shop, total = text.split("; total ")
        return (image, *rng.choice([("What is the total amount on the receipt?", total), ("What is the name of the shop?", shop),
                                    ("这张收据的总金额是多少？", f"总金额是{total}。")]))
    return image, *rng.choice([("What text is written in the image?", text), ("Read the text in the image.", text),
                              (ZH_IMAGE_QUESTIONS["read"], f"图片中的文字是“{text}”。"),
                              ("Is there any text in this image? If so, what does it say?", f"Yes, it says \"{text}\".")])


def multi_turn_sample(rng: random.Random):
    """(image, first question, first answer, follow-up turns)."""
    choice = rng.random()
    if choice < 0.5:
        name = rng.choice(photo_names())
        en, zh, qas = PHOTOS[name]
        picked = rng.sample(qas, min(2, len(qas)))
        return load_photo(rng, name), "Describe the image briefly.", en.split(". ")[0].rstrip(".") + ".", tuple(picked)
    if choice < 0.75:
        image, facts = render_chart(rng)
        first = chart_question(rng, facts)
        follow = [chart_question(rng, facts) for _ in range(2)]
        return image, first[0], first[1], tuple(q for q in follow if q[0] != first[0])
    image, facts = render_table(rng)
    first = table_question(rng, facts)
    follow = [table_question(rng, facts) for _ in range(2)]
    return image, first[0], first[1], tuple(q for q in follow if q[0] != first[0])


def text_en_sample(rng: random.Random, corpus: list[str]) -> tuple[str, str]:
    choice = rng.random()
    if choice < 0.3:
        start = rng.randrange(len(corpus))
        text = "\n\n".join(corpus[start : start + 4])
        return "Continue the text: " + text[:200], text[200:]
    if choice < 0.45:
        paragraph = rng.choice(corpus)
        return f"Summarize the following paragraph in one sentence.\n\n{paragraph}", paragraph.split(". ")[0].rstrip(".") + "."
    if choice < 0.6:
        a, b, price = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 20)
        item = rng.choice(["pencils", "tickets", "apples", "notebooks", "cups of tea"])
        return (f"A shop sells {item} for {price} dollars each. Anna buys {a} and Ben buys {b}. How much do they pay together?",
                f"They buy {a} + {b} = {a + b} {item}, so they pay {a + b} x {price} = {(a + b) * price} dollars.")
    if choice < 0.75:
        sentence, targets = rng.choice(TRANSLATE)
        language = rng.choice(sorted(targets))
        return f"Translate into {language}: {sentence}", targets[language]
    return rng.choice(TEXT_EN)


def generate(count: int, seed: int, corpus: list[str]):
    """Yields (kind, image or None, question, answer, follow-up turns) for `count` samples."""
    rng = random.Random(seed)
    schedule: list[str] = []
    for _ in range(count):
        if not schedule:
            schedule = list(SCHEDULE)
            rng.shuffle(schedule)
        kind = schedule.pop()
        if kind == "photo" and not photo_names():
            kind = "chart"  # a stripped install without the photos: charts stand in
        turns: tuple = ()
        image = None
        if kind == "photo":
            image, question, answer = photo_sample(rng)
        elif kind == "document":
            image, question, answer = document_sample(rng, corpus)
        elif kind == "chart":
            image, facts = render_chart(rng)
            question, answer = chart_question(rng, facts)
        elif kind == "table":
            image, facts = render_table(rng)
            question, answer = table_question(rng, facts)
        elif kind == "ocr":
            image, question, answer = ocr_sample(rng)
        elif kind == "multi_turn":
            image, question, answer, turns = multi_turn_sample(rng)
        elif kind == "text_en":
            question, answer = text_en_sample(rng, corpus)
        else:
            question, answer = rng.choice(TEXT_ZH)
        yield kind, image, question, answer, turns

