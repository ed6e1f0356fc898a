"""The built-in calibration set (`builtin-v3`): what InternVL is used for, offline, a few hundred KB.

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

Short-answer VQA (`builtin-v3`, the default): in every block of 20, one photo, document, chart,
table and OCR crop (5 of the 15 samples with a picture) is asked a question in the formats
`verify` and VLMEvalKit use (io.slices.prompt_of: "... Answer the question using a single word or
phrase.", "... Please answer yes or no.", "Question: ... Options: A. ... Answer with the option's
letter from the given choices directly."), answered with a word, a number, Yes / No (alternating,
so balanced) or a letter, and every multi-turn conversation gets one such turn. The answers are
facts of the generated content (the values a chart drew, the cells a table rendered, the text a
sign shows, its ink colour) or, for the photos, facts checked by eye on the shipped files
(PHOTO_VQA), asked of a mildly cropped whole photo. About a fifth are asked in Chinese (with
verify's English suffixes, as verify asks a Chinese row). `builtin-v2` (version="builtin-v2")
draws the previous set, sample for sample.

PIL's bundled font has no CJK glyphs, so Chinese appears in prompts and answers, never inside
rendered images. Everything is generated on the fly; only the photos are files.
"""

from __future__ import annotations

import math
import random
import re
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

VERSION = "builtin-v3"
VERSIONS = ("builtin-v2", "builtin-v3")
DATA = Path(__file__).with_name("data")
KINDS = ("photo", "document", "chart", "table", "ocr", "multi_turn", "text_en", "text_zh")
# one block of 20 samples; shuffled per block by the seeded RNG
SCHEDULE = (["photo"] * 4 + ["document"] * 3 + ["chart"] * 2 + ["table"] * 2 + ["ocr"] * 2 + ["multi_turn"] * 2
            + ["text_en"] * 3 + ["text_zh"] * 2)
# builtin-v3: per block, how many samples of a kind ask a short-answer question in verify's formats (the
# first ones of that kind in the shuffled block); every multi_turn sample also gets one short-answer turn
SHORT_PER_BLOCK = {"photo": 1, "document": 1, "chart": 1, "table": 1, "ocr": 1}
# how often each answer format is drawn for a short-answer turn, and the share asked in Chinese
FORMAT_WEIGHTS = {"short": 4, "yes_no": 3, "multiple_choice": 3}
CHINESE_SHARE = 0.25
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

# name -> short-answer facts of the shipped photo, checked by eye on the file and true of any mild crop
# (load_photo(whole=True)): (question, answer, None) or, for multiple choice, (question, right option, wrong options).
# Every photo has Yes and No questions, so yes / no answers can alternate.
PHOTO_VQA = {
    "astronaut": [
        ("What color is the person's suit?", "Orange", None), ("How many people are in the image?", "1", None),
        ("What is the person holding?", "Helmet", None), ("Is there a flag in the image?", "Yes", None),
        ("Is the person smiling?", "Yes", None), ("Is there a model of a space shuttle in the image?", "Yes", None),
        ("Is the person wearing a helmet on the head?", "No", None), ("Is this a black and white photo?", "No", None),
        ("What is the person's profession?", "astronaut", ("chef", "farmer", "firefighter")),
        ("What color is the person's suit?", "orange", ("blue", "green", "white")),
        ("图中人物穿的衣服是什么颜色？", "橙色", None), ("图中有几个人？", "1", None)],
    "camera": [
        ("What is the man looking through?", "Camera", None), ("How many people are in the image?", "1", None),
        ("What is the camera mounted on?", "Tripod", None), ("Is this a black and white photo?", "Yes", None),
        ("Is there a tripod in the image?", "Yes", None), ("Is the man wearing a coat?", "Yes", None),
        ("Is this a color photo?", "No", None), ("Is there a dog in the image?", "No", None),
        ("What is the man using?", "a camera", ("a bicycle", "a guitar", "a laptop")),
        ("这张照片是彩色的还是黑白的？", "黑白", None)],
    "chelsea": [
        ("What animal is this?", "Cat", None), ("What color are the cat's eyes?", "Green", None),
        ("Is this a cat?", "Yes", None), ("Does the animal have whiskers?", "Yes", None),
        ("Is the animal a dog?", "No", None), ("Are the cat's eyes closed?", "No", None),
        ("Which animal is shown in the image?", "cat", ("dog", "rabbit", "horse")), ("这是什么动物？", "猫", None)],
    "coffee": [
        ("What drink is in the cup?", "Coffee", None), ("How many spoons are there?", "1", None),
        ("What is the table made of?", "Wood", None), ("Is there a spoon on the saucer?", "Yes", None),
        ("Is the cup on a saucer?", "Yes", None), ("Is the cup empty?", "No", None),
        ("Is there a glass of water in the image?", "No", None),
        ("What is in the cup?", "coffee", ("tea", "orange juice", "milk")), ("杯子里是什么饮料？", "咖啡", None)],
    "rocket": [
        ("What stands in the middle of the image?", "Rocket", None), ("What color is the rocket?", "White", None),
        ("Is there a rocket in the image?", "Yes", None), ("Are there lights on the ground?", "Yes", None),
        ("Is the rocket in flight?", "No", None), ("Are there people in the image?", "No", None),
        ("What is standing on the launch pad?", "a rocket", ("an airplane", "a helicopter", "a ship")),
        ("图片中间是什么？", "火箭", None)],
    "horse": [
        ("What animal is shown?", "Horse", None), ("What color is the background?", "White", None),
        ("What color is the horse?", "Black", None), ("Is the horse facing right?", "Yes", None),
        ("Is the background white?", "Yes", None), ("Is the horse facing left?", "No", None),
        ("Is there a rider on the horse?", "No", None),
        ("Which animal is shown?", "horse", ("elephant", "cat", "bird")), ("这是什么动物的剪影？", "马", None)],
    "hubble_deep_field": [
        ("What color is the background?", "Black", None), ("What does the image show?", "Galaxies", None),
        ("Is this an image of space?", "Yes", None), ("Is there a person in the image?", "No", None),
        ("Was this image taken underwater?", "No", None),
        ("What does the image show?", "galaxies", ("a forest", "a city", "an ocean")), ("这张图拍的是什么？", "星系", None)],
    "retina": [
        ("Which part of the eye is shown?", "Retina", None), ("Is this a medical image?", "Yes", None),
        ("Are blood vessels visible?", "Yes", None), ("Is this a photo of a landscape?", "No", None),
        ("What does the image show?", "the retina of an eye", ("a planet", "a slice of orange", "a coin")),
        ("这是什么类型的医学图像？", "眼底照片", None)],
    "text": [
        ("Is the writing printed or handwritten?", "Handwritten", None), ("What is written on the paper?", "Equations", None),
        ("Is there handwriting in the image?", "Yes", None), ("Is this a printed book page?", "No", None),
        ("Is there a person in the image?", "No", None),
        ("What is written on the paper?", "mathematical equations", ("a shopping list", "a poem", "a map"))],
    "clock_motion": [
        ("Is the image blurred?", "Yes", None), ("Is the image in color?", "No", None),
        ("Why is the image hard to see?", "Motion blur", None)],
    "cell": [
        ("How many cells are visible?", "1", None), ("Is this a microscope image?", "Yes", None),
        ("Is this image in color?", "No", None), ("图中有几个细胞？", "1", None)],
    "brick": [
        ("What is the wall made of?", "Brick", None), ("Is this a brick wall?", "Yes", None),
        ("Is there a window in the image?", "No", None),
        ("What is shown in the image?", "a brick wall", ("a lake", "a cat", "a car"))],
    "grass": [
        ("What plant covers the ground?", "Grass", None), ("Is the image in black and white?", "Yes", None),
        ("Is there a person in the image?", "No", None)],
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
SHOPS = ["CORNER MARKET", "FRESH FOODS", "CITY GROCER", "GREEN SHOP"]
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
CJK = re.compile(r"[\u4e00-\u9fff]")
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


def load_photo(rng: random.Random, name: str, whole: bool = False) -> Image.Image:
    """A shipped photo, cropped to a random aspect ratio and resized to a tiling-friendly size.
    `whole`: only a mild crop (94-100% of each side) resized to the size nearest its own aspect
    ratio, so PHOTO_VQA's facts stay true of it."""
    image = Image.open(DATA / f"{name}.jpg").convert("RGB")
    w, h = image.size
    if whole:
        crop_w, crop_h = round(w * rng.uniform(0.94, 1.0)), round(h * rng.uniform(0.94, 1.0))
        x, y = rng.randint(0, w - crop_w), rng.randint(0, h - crop_h)
        sizes = sorted({s for group in SIZES.values() for s in group})
        best = min(abs(math.log(s[0] / s[1] * crop_h / crop_w)) for s in sizes)
        target = rng.choice([s for s in sizes if abs(math.log(s[0] / s[1] * crop_h / crop_w)) <= best + 0.01])
        return image.crop((x, y, x + crop_w, y + crop_h)).resize(target, Image.BICUBIC)
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


BOARDS = {(250, 250, 250): "white", (20, 90, 40): "green", (180, 20, 20): "red", (20, 40, 120): "blue", (240, 200, 0): "yellow"}


def render_ocr(rng: random.Random, fit: bool = False) -> tuple[Image.Image, str, str, dict]:
    """Text in an image: a sign, a label with a serial number, or a receipt. Returns (image, text,
    kind, facts: shop, total, items (receipt) or ink, board (colour names; sign, label)).
    `fit`: a sign or label too wide for the picture is drawn smaller, so all its text shows
    (builtin-v2 drew it at the drawn size, cut at the edges)."""
    kind = rng.choice(["sign", "sign", "label", "receipt"])
    if kind == "receipt":
        items = [(name, rng.randint(1, 9) + rng.choice([0.0, 0.25, 0.5, 0.99])) for name in rng.sample(RECEIPT_ITEMS, rng.randint(3, 7))]
        total = sum(price for _, price in items)
        size = rng.choice([(448, 896), (336, 896), (448, 1344)])
        image = Image.new("RGB", size, (252, 252, 248))
        draw = ImageDraw.Draw(image)
        body = 20
        y = 30
        shop = rng.choice(SHOPS)
        draw.text((30, y), shop, fill=(10, 10, 10), font=font(body + 6))
        y += 60
        for name, price in items:
            draw.text((30, y), name, fill=(20, 20, 20), font=font(body))
            draw.text((size[0] - 110, y), f"{price:.2f}", fill=(20, 20, 20), font=font(body))
            y += 34
        draw.line([(30, y), (size[0] - 30, y)], fill=(40, 40, 40), width=2)
        draw.text((30, y + 12), "TOTAL", fill=(0, 0, 0), font=font(body + 2))
        draw.text((size[0] - 110, y + 12), f"{total:.2f}", fill=(0, 0, 0), font=font(body + 2))
        facts = {"shop": shop, "total": f"{total:.2f}", "items": [name for name, _ in items]}
        return image.filter(ImageFilter.GaussianBlur(0.6)), f"{shop}; total {total:.2f}", "receipt", facts
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
    while fit and width > size[0] - 80 and face.size > 16:  # the board (20 px each side) and the rotation stay inside
        face = font(face.size - 4)
        width = draw.textlength(text, font=face)
    board = rng.choice(list(BOARDS))
    ink = (0, 0, 0) if sum(board) > 500 else (255, 255, 255)
    x0, y0 = (size[0] - width) / 2, size[1] / 2 - face.size
    draw.rectangle([x0 - 20, y0 - 15, x0 + width + 20, y0 + face.size * 1.6], fill=board)
    draw.text((x0, y0), text, fill=ink, font=face)
    image = image.rotate(rng.uniform(-6, 6), resample=Image.BICUBIC, fillcolor=background)
    return image, text, kind, {"ink": "black" if ink == (0, 0, 0) else "white", "board": BOARDS[board]}


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


def ocr_sample(rng: random.Random, fit: bool = False):
    image, text, kind, _ = render_ocr(rng, fit)
    if kind == "receipt":
        shop, total = text.split("; total ")
        return (image, *rng.choice([("What is the total amount on the receipt?", total), ("What is the name of the shop?", shop),
                                    ("这张收据的总金额是多少？", f"总金额是{total}。")]))
    return image, *rng.choice([("What text is written in the image?", text), ("Read the text in the image.", text),
                              (ZH_IMAGE_QUESTIONS["read"], f"图片中的文字是“{text}”。"),
                              ("Is there any text in this image? If so, what does it say?", f"Yes, it says \"{text}\".")])


class Asker:
    """Short-answer turns in verify's prompt formats (io.slices.prompt_of, so the suffixes are
    verify's own strings): draws the format and the language with the seeded RNG, and alternates
    the Yes / No answers so they stay balanced."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.yes_next = True

    def format(self) -> str:
        """'short', 'yes_no' or 'multiple_choice' (FORMAT_WEIGHTS)."""
        return self.rng.choices(list(FORMAT_WEIGHTS), weights=list(FORMAT_WEIGHTS.values()))[0]

    def chinese(self) -> bool:
        return self.rng.random() < CHINESE_SHARE

    def polarity(self) -> bool:
        """The answer the next yes / no question must have: True, False, True, ..."""
        yes, self.yes_next = self.yes_next, not self.yes_next
        return yes

    @staticmethod
    def short(question: str, answer: str) -> tuple[str, str]:
        """(question + verify's suffix for its answer: yes / no or a word or phrase, answer)."""
        from ..io.slices import BenchItem, prompt_of

        return prompt_of(BenchItem("", question, answer)), answer

    def choice(self, question: str, right: str, wrong: list[str]) -> tuple[str, str]:
        """(multiple-choice prompt with `right` and up to 3 of `wrong` as options A-D, shuffled, the right letter)."""
        from ..io.slices import BenchItem, prompt_of

        wrong = [w for w in dict.fromkeys(wrong) if w != right]
        options = [right] + self.rng.sample(wrong, min(3, len(wrong)))
        self.rng.shuffle(options)
        letters = dict(zip("ABCD", options))
        answer = "ABCD"[options.index(right)]
        return prompt_of(BenchItem("", question, answer, None, letters)), answer


def photo_short(ask: Asker, name: str) -> tuple[str, str]:
    """A short-answer turn about shipped photo `name` (PHOTO_VQA)."""
    facts = PHOTO_VQA[name]
    fmt, chinese = ask.format(), ask.chinese()
    if fmt == "yes_no":
        want = "Yes" if ask.polarity() else "No"
        question, answer, _ = ask.rng.choice([f for f in facts if f[1] == want])
        return ask.short(question, answer)
    choices = [f for f in facts if f[2]]
    if fmt == "multiple_choice" and choices:
        question, right, wrong = ask.rng.choice(choices)
        return ask.choice(question, right, list(wrong))
    words = [f for f in facts if not f[2] and f[1] not in ("Yes", "No")]
    zh = [f for f in words if CJK.search(f[0])]
    question, answer, _ = ask.rng.choice(zh if chinese and zh else [f for f in words if f not in zh])
    return ask.short(question, answer)


def chart_short(ask: Asker, facts: dict) -> tuple[str, str]:
    """A short-answer turn about a chart render_chart drew: its largest / smallest category, a
    value, the number of categories, its kind or title, which of two values is higher."""
    rng, labels, values, kind, title = ask.rng, facts["labels"], facts["values"], facts["kind"], facts["title"]
    fmt, chinese = ask.format(), ask.chinese()
    top = labels[values.index(max(values))] if values.count(max(values)) == 1 else None
    low = labels[values.index(min(values))] if values.count(min(values)) == 1 else None
    pick = rng.randrange(len(labels))
    shown = f"{values[pick]}%" if facts["unit"] == "percent" else str(values[pick])
    titles = [t for t, _, _ in CHART_DATA if t != title]
    if fmt == "yes_no":
        yes = ask.polarity()
        pairs = [(i, j) for i in range(len(labels)) for j in range(len(labels)) if values[i] > values[j]]
        if pairs and rng.random() < 0.5:
            i, j = rng.choice(pairs) if yes else rng.choice(pairs)[::-1]
            if chinese:
                return ask.short(f"{labels[i]}的数值比{labels[j]}高吗？", "Yes" if yes else "No")
            return ask.short(f"Is the value of {labels[i]} higher than the value of {labels[j]}?", "Yes" if yes else "No")
        if rng.random() < 0.5:
            asked = kind if yes else rng.choice([k for k in ("bar", "line", "pie") if k != kind])
            return ask.short(f"Is this a {asked} chart?", "Yes" if yes else "No")
        asked = title if yes else rng.choice(titles)
        return ask.short(f"Is the title of the chart \"{asked}\"?", "Yes" if yes else "No")
    if fmt == "multiple_choice":
        options = [("What type of chart is this?", f"{kind} chart", [f"{k} chart" for k in ("bar", "line", "pie", "scatter")]),
                   ("What is the title of the chart?", title, titles)]
        if low:
            options.append(("Which category has the lowest value?", low, labels))
        if top:
            options.append(("图表中哪一项的数值最大？" if chinese else "Which category has the highest value?", top, labels))
        question, right, wrong = rng.choice(options)
        return ask.choice(question, right, wrong)
    if chinese:
        return ask.short(*rng.choice([(f"{labels[pick]}的数值是多少？", shown), ("图表中有几个类别？", str(len(labels)))]
                                     + ([("图表中哪一项的数值最大？", top)] if top else [])))
    return ask.short(*rng.choice([(f"What is the value of {labels[pick]}?", shown),
                                  ("How many categories does the chart show?", str(len(labels))),
                                  ("What is the title of the chart?", title)]
                                 + ([("Which category has the highest value?", top)] if top else [])))


def table_short(ask: Asker, facts: dict) -> tuple[str, str]:
    """A short-answer turn about a table render_table drew: a cell, the number of rows or columns,
    the row with the largest last column, whether a name is listed."""
    rng, header, rows, kind = ask.rng, facts["header"], facts["rows"], facts["kind"]
    fmt, chinese = ask.format(), ask.chinese()
    row, column = rng.choice(rows), rng.randrange(1, len(header))
    cell, others = row[column], [v for v in dict.fromkeys(r[column] for r in rows) if v != row[column]]
    names = next(pool for _, (pool,), k in TABLES if k == kind)
    unlisted = [n for n in names if n not in [r[0] for r in rows]]
    last = [float(r[-1]) for r in rows] if kind in ("price", "population", "grades") else []
    top = rows[last.index(max(last))][0] if last and last.count(max(last)) == 1 else None
    count = str(len(rows))
    ask_cell = f"表格中{row[0]}这一行的{header[column]}是多少？" if chinese else f"In the row of {row[0]}, what is the {header[column]}?"
    ask_rows = ZH_IMAGE_QUESTIONS["rows"] if chinese else "How many rows of data does the table have, not counting the header?"
    ask_top = f"Which {header[0].lower()} has the largest {header[-1]}?"
    if fmt == "yes_no":
        yes = ask.polarity()
        answer = "Yes" if yes else "No"
        if unlisted and rng.random() < 0.5:
            name = row[0] if yes else rng.choice(unlisted)
            return ask.short(f"表格中有{name}吗？" if chinese else f"Is {name} listed in the table?", answer)
        if others:
            value = cell if yes else rng.choice(others)
            return ask.short(f"In the row of {row[0]}, is the {header[column]} {value}?", answer)
        rows_asked = count if yes else str(len(rows) + rng.choice([-1, 1]))
        return ask.short(f"Does the table have {rows_asked} rows of data, not counting the header?", answer)
    if fmt == "multiple_choice":
        options = [(ask_rows, count, [str(len(rows) + d) for d in (-2, -1, 1, 2) if len(rows) + d > 0])]
        if others:
            options.append((ask_cell, cell, others))
        if top:
            options.append((ask_top, top, [r[0] for r in rows]))
        return ask.choice(*rng.choice(options))
    options = [(ask_cell, cell), (ask_rows, count)]
    if not chinese:
        options.append(("How many columns does the table have?", str(len(header))))
        if top:
            options.append((ask_top, top))
    return ask.short(*rng.choice(options))


def document_short(ask: Asker, title: str) -> tuple[str, str]:
    """A short-answer turn about a page render_document drew: its title, its kind, its language."""
    rng = ask.rng
    fmt, chinese = ask.format(), ask.chinese()
    titles = [t for t, _ in DOC_TOPICS]
    kind_of = {t: " ".join(w for w in t.split(":")[0].split() if not w.isdigit()) for t in titles}
    ask_title = ZH_IMAGE_QUESTIONS["title"] if chinese else "What is the title of this document?"
    if fmt == "yes_no":
        yes = ask.polarity()
        if rng.random() < 0.6:
            asked = title if yes else rng.choice([t for t in titles if t != title])
            question = f"这个文档的标题是“{asked}”吗？" if chinese else f"Is the title of this document \"{asked}\"?"
            return ask.short(question, "Yes" if yes else "No")
        if yes:
            return ask.short(rng.choice(["Is this document written in English?", "Is the text of this page printed?"]), "Yes")
        return ask.short(rng.choice(["Is this document written in Chinese?", "Is this page handwritten?",
                                     "Does this page contain a photograph?"]), "No")
    if fmt == "multiple_choice":
        return ask.choice(*rng.choice([(ask_title, title, titles),
                                       ("What kind of document is this?", kind_of[title], list(kind_of.values()))]))
    return ask.short(*rng.choice([(ask_title, title)] + ([] if chinese else [("What kind of document is this?", kind_of[title])])))


ZH_INK = {"black": "黑色", "white": "白色"}


def _serial(rng: random.Random) -> str:
    return f"SN {rng.randint(10000, 99999)}-{rng.choice('ABCDEFGHJK')}{rng.randint(10, 99)}"


def ocr_short(ask: Asker, text: str, kind: str, facts: dict) -> tuple[str, str]:
    """A short-answer turn about what render_ocr drew: a sign's text, a label's serial number, the ink
    and board colours, a receipt's total, shop, number of items, whether an item is on it."""
    rng = ask.rng
    fmt, chinese = ask.format(), ask.chinese()
    if kind == "receipt":
        items, shop, total = facts["items"], facts["shop"], facts["total"]
        count = str(len(items))
        ask_total = "这张收据的总金额是多少？" if chinese else "What is the total amount on the receipt?"
        ask_count = "收据上有几件商品？" if chinese else "How many items are listed on the receipt?"
        if fmt == "yes_no":
            yes = ask.polarity()
            name = rng.choice(items) if yes else rng.choice([i for i in RECEIPT_ITEMS if i not in items])
            return ask.short(f"收据上有{name}吗？" if chinese else f"Is {name} on the receipt?", "Yes" if yes else "No")
        if fmt == "multiple_choice":
            cents = round(float(total) * 100)
            totals = [f"{(cents + d) / 100:.2f}" for d in (-250, -100, 75, 300) if cents + d > 0]
            return ask.choice(*rng.choice([("What is the name of the shop?", shop, SHOPS), (ask_total, total, totals),
                                           (ask_count, count, [str(len(items) + d) for d in (-2, -1, 1, 2) if len(items) + d > 0])]))
        return ask.short(*rng.choice([(ask_total, total), (ask_count, count)] + ([] if chinese else [("What is the name of the shop?", shop)])))
    sign = kind == "sign"
    wrong = [t for t in SIGNS if t != text] if sign else [_serial(rng) for _ in range(3)]
    if chinese or sign:  # the whole text
        ask_text, shown = ZH_IMAGE_QUESTIONS["read"] if chinese else "What does the sign say?", text
    else:  # the serial number without its "SN "
        ask_text, shown = "What is the serial number on the label?", text.removeprefix("SN ")
        wrong = [w.removeprefix("SN ") for w in wrong]
    ink, board = facts["ink"], facts["board"]
    if fmt == "yes_no":
        yes = ask.polarity()
        if rng.random() < 0.5:
            asked = text if yes else (rng.choice(wrong) if sign else "SN " + wrong[0].removeprefix("SN "))
            return ask.short(f"Does the text in the image say \"{asked}\"?", "Yes" if yes else "No")
        asked = ink if yes else {"black": "white", "white": "black"}[ink]
        question = f"图中的文字是{ZH_INK[asked]}的吗？" if chinese else f"Is the text written in {asked} letters?"
        return ask.short(question, "Yes" if yes else "No")
    if fmt == "multiple_choice":
        return ask.choice(*rng.choice([(ask_text, shown, wrong),
                                       ("What color is the board behind the text?", board, list(BOARDS.values()))]))
    return ask.short(*rng.choice([(ask_text, shown)] + ([] if chinese else [("What color are the letters?", ink.capitalize())])))


def multi_turn_sample(rng: random.Random, ask: Asker | None = None):
    """(image, first question, first answer, follow-up turns). `ask` (builtin-v3): one short-answer
    turn joins the follow-ups at a random place (the photo is then only mildly cropped)."""
    choice = rng.random()
    if choice < 0.5 and photo_names():  # a stripped install without the photos: a chart
        name = rng.choice(photo_names())
        en, zh, qas = PHOTOS[name]
        picked = rng.sample(qas, min(2, len(qas)))
        image, question, answer = load_photo(rng, name, whole=ask is not None), "Describe the image briefly.", en.split(". ")[0].rstrip(".") + "."
        follow = picked
        short = photo_short(ask, name) if ask else None
    elif choice < 0.75:
        image, facts = render_chart(rng)
        (question, answer), follow = chart_question(rng, facts), [chart_question(rng, facts) for _ in range(2)]
        follow = [q for q in follow if q[0] != question]
        short = chart_short(ask, facts) if ask else None
    else:
        image, facts = render_table(rng)
        (question, answer), follow = table_question(rng, facts), [table_question(rng, facts) for _ in range(2)]
        follow = [q for q in follow if q[0] != question]
        short = table_short(ask, facts) if ask else None
    if short:
        follow.insert(rng.randint(0, len(follow)), short)
    return image, question, answer, tuple(follow)


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


def generate(count: int, seed: int, corpus: list[str], version: str = VERSION):
    """Yields (kind, image or None, question, answer, follow-up turns) for `count` samples of `version`
    (VERSIONS; builtin-v2 without the short-answer turns, sample for sample as before). ValueError
    for another version."""
    if version not in VERSIONS:
        raise ValueError(f"unknown built-in calibration set {version!r}; one of {', '.join(VERSIONS)}")
    short = version != "builtin-v2"
    rng = random.Random(seed)
    ask = Asker(rng)
    schedule: list[tuple[str, bool]] = []
    for _ in range(count):
        if not schedule:
            block = list(SCHEDULE)
            rng.shuffle(block)
            seen: dict[str, int] = {}
            for kind in reversed(block):  # drawn from the end: the first of each kind drawn asks the short question
                schedule.insert(0, (kind, short and seen.get(kind, 0) < SHORT_PER_BLOCK.get(kind, 0)))
                seen[kind] = seen.get(kind, 0) + 1
        kind, vqa = schedule.pop()
        if kind == "photo" and not photo_names():
            kind = "chart"  # a stripped install without the photos: charts stand in
        turns: tuple = ()
        image = None
        if kind == "photo" and vqa:
            name = rng.choice(photo_names())
            image = load_photo(rng, name, whole=True)
            question, answer = photo_short(ask, name)
        elif kind == "photo":
            image, question, answer = photo_sample(rng)
        elif kind == "document" and vqa:
            start = rng.randrange(len(corpus))
            image, title, _, _ = render_document(rng, corpus[start : start + 8])
            question, answer = document_short(ask, title)
        elif kind == "document":
            image, question, answer = document_sample(rng, corpus)
        elif kind == "chart":
            image, facts = render_chart(rng)
            question, answer = chart_short(ask, facts) if vqa else chart_question(rng, facts)
        elif kind == "table":
            image, facts = render_table(rng)
            question, answer = table_short(ask, facts) if vqa else table_question(rng, facts)
        elif kind == "ocr" and vqa:
            image, text, ocr_kind, facts = render_ocr(rng, fit=True)
            question, answer = ocr_short(ask, text, ocr_kind, facts)
        elif kind == "ocr":
            image, question, answer = ocr_sample(rng, fit=short)
        elif kind == "multi_turn":
            image, question, answer, turns = multi_turn_sample(rng, ask if short else None)
        elif kind == "text_en":
            question, answer = text_en_sample(rng, corpus)
        else:
            question, answer = rng.choice(TEXT_ZH)
        yield kind, image, question, answer, turns
