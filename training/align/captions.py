"""A small built-in caption set per modality (written for this project), for decoding-side alignment
when no caption file is at hand: ``polymodal train --stage decode --data builtin``.

Decoding alignment needs only captions (NExT-GPT, sec. 4.2: the targets are the decoder's own text
encoder's embeddings of the caption), so these lists are enough to align output projectors to a decoder's
conditioning space; larger caption sets (AudioCaps, CC3M, WebVid) give better coverage.
"""

from __future__ import annotations

from polymodal.modality import Modality

_IMAGE = """
a red kite flying over a sandy beach
a black cat sleeping on a wooden chair
a cup of coffee with latte art on a saucer
a white rocket on the launch pad under a blue sky
an astronaut in a white suit in front of a flag
a horse running across a green field
the grey surface of the moon covered with craters
a bowl of fresh fruit on a kitchen table
a snowy mountain peak at sunrise
a busy city street at night with neon signs
a small boat on a calm lake at dawn
a yellow taxi parked in front of a brick building
a dog catching a frisbee in a park
a field of sunflowers under a clear sky
an old lighthouse on a rocky coast
a plate of pasta with tomato sauce and basil
a child riding a bicycle down a quiet road
a forest path covered with autumn leaves
a red double decker bus on a bridge
a close up of a green leaf with water drops
a pile of old coins on a dark table
a wall clock with roman numerals
a waterfall in a tropical forest
a bird sitting on a branch in the rain
a desert with sand dunes and a blue sky
a bookshelf full of colourful books
a vintage car parked by the sea
a man playing guitar on a stage
a woman reading a book in a cafe
a train crossing a bridge over a river
a colourful hot air balloon in the sky
a snowman in a garden covered with snow
a stack of pancakes with honey
a sailboat on the ocean at sunset
a green tractor working in a wheat field
a wooden cabin in a pine forest
a street market with fruit and vegetables
a city skyline reflected in the water
a group of penguins standing on ice
a candle burning on a dark table
"""

_AUDIO = """
a dog barks several times in the distance
rain falls steadily on a tin roof
a man speaks while a car engine idles
birds chirp and sing in the morning
a train horn blares as a train passes
waves crash on a beach with wind blowing
a crowd cheers and applauds loudly
a baby cries while a woman talks softly
a helicopter flies overhead and fades away
someone types quickly on a keyboard
water runs from a tap into a sink
thunder rumbles during a heavy storm
a church bell rings several times
a cat meows and purrs
footsteps walk across a wooden floor
a motorcycle accelerates down the road
people talk in a busy restaurant
a clock ticks in a quiet room
an airplane engine roars during takeoff
a piano plays a slow gentle melody
a siren wails as an ambulance passes
wind blows through the trees
a door creaks open and slams shut
a man coughs and clears his throat
ducks quack near a pond
a phone rings and someone answers
children laugh and play in a playground
a vacuum cleaner runs and then stops
fire crackles in a fireplace
a woman sings while a guitar plays
a hammer hits a nail repeatedly
a bus stops and its doors open
paper is crumpled and torn
a bell on a bicycle rings twice
a horse gallops on a hard road
a kettle whistles as water boils
a dog growls and then barks
a crowd murmurs in a large hall
a drum beats a steady rhythm
insects buzz on a summer evening
"""

_VIDEO = """
a dog running along a beach at sunset
cars driving on a highway at night
a woman dancing in a studio
clouds moving fast over a mountain
a cat playing with a ball of yarn
waves rolling onto a sandy shore
a chef chopping vegetables in a kitchen
people walking through a busy train station
a bird flying over a lake
a man riding a horse across a field
fireworks exploding over a city
a child blowing out birthday candles
leaves falling from a tree in autumn
a boat sailing across a calm bay
a time lapse of a flower opening
snow falling on a quiet street
a skateboarder jumping in a park
a waterfall flowing into a pool
a train moving through the countryside
a hand writing on a sheet of paper
a drone flying over a green forest
a candle flame flickering in the dark
a runner crossing a finish line
coffee being poured into a white cup
a city skyline from day to night
a cyclist riding down a mountain road
fish swimming in a coral reef
a man playing drums on a stage
rain falling on a window
a plane taking off from a runway
a couple walking on a beach
a hot air balloon rising at dawn
a potter shaping clay on a wheel
a squirrel eating a nut on a branch
a crowd waving flags at a stadium
smoke rising from a chimney
a car driving through a desert
a baby laughing in a crib
ice melting in the sun
a spinning globe on a desk
"""


def _lines(block: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in block.strip().splitlines() if line.strip())


BUILTIN_CAPTIONS: dict[Modality, tuple[str, ...]] = {
    Modality.IMAGE: _lines(_IMAGE),
    Modality.AUDIO: _lines(_AUDIO),
    Modality.VIDEO: _lines(_VIDEO),
}
